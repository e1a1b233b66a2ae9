/* arceus provide --install-service (service.c). */
#ifndef AR_CLI_SERVICE_H
#define AR_CLI_SERVICE_H

/* Write a systemd user unit that runs `arceus provide` with argv's options
 * (argv[0] is "provide"; --install-service and the token are left out: the
 * token goes to a 0600 environment file beside it), then enable and start it
 * with systemctl --user; systemd waits grace_s and 30 s more for it to stop
 * (a graceful leave). cpu_limit (--cpu-limit) under 100 becomes the unit's
 * CPUQuota= (cpu_limit x the online CPUs, in percent of one CPU) and is left
 * out of ExecStart=. Prints what it did and how to undo it. The exit
 * code: 0, 1 when it could not finish (systemctl missing or failing: said
 * why), 2 for options it cannot write into a unit. */
int ar_cli_install_service(int argc, char **argv, const char *token, const char *market, double grace_s,
                           int cpu_limit);

#endif
