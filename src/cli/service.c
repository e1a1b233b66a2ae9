/* arceus provide --install-service: a systemd user unit that runs this
 * provider at login and after crashes.
 *
 * What it writes, under $XDG_CONFIG_HOME (or ~/.config):
 *   systemd/user/arceus-provide.service  ExecStart= this binary (its real
 *       path) with the options given now, less --install-service and the
 *       token; WorkingDirectory= the current folder, so relative paths
 *       (--tls-cert tls/server.pem) mean what they meant here; with
 *       --cpu-limit PCT under 100, CPUQuota= holds it instead (below)
 *   arceus/provide.env  ARCEUS_TOKEN=..., mode 0600: the token stays out of
 *       the unit (which anyone may read) and out of `ps`
 * then runs `systemctl --user daemon-reload` and `systemctl --user enable
 * --now arceus-provide.service`, and says what it did and how to undo it. */
#include "cli/service.h"
#include "cli/cli.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define UNIT_NAME "arceus-provide.service"
#define CMD "provide"

/* mkdir -p, each new folder 0700 (they hold the token's file) */
static int make_dirs(const char *path)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return -1;
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            if (mkdir(buf, 0700) != 0 && errno != EEXIST)
                return -1;
            *p = c;
            if (c == '\0')
                return 0;
        }
    }
}

/* Write data to path through a temporary file in the same folder, created
 * with mode, then renamed over path: a reader never sees half of it, and
 * the token's file is never readable by others, not even for a moment. */
static int write_file(const char *path, const char *data, mode_t mode)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    size_t len = strlen(data), off = 0;
    while (off < len) {
        ssize_t w = write(fd, data + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            close(fd);
            unlink(tmp);
            return -1;
        }
        off += (size_t)w;
    }
    if (fchmod(fd, mode) != 0 || fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* One word of ExecStart= as systemd reads it: in double quotes, with '\'
 * and '"' escaped, '%' (a specifier) doubled and '$' (a variable) doubled.
 * Control characters are refused: they have no place in an option. */
static int append_word(char *buf, size_t size, size_t *len, const char *word)
{
    if (*len + 2 >= size)
        return -1;
    buf[(*len)++] = ' ';
    buf[(*len)++] = '"';
    for (const unsigned char *p = (const unsigned char *)word; *p; p++) {
        if (*p < 0x20 || *p == 0x7f)
            return -1;
        const char *esc = *p == '\\' ? "\\\\" : *p == '"' ? "\\\"" : *p == '%' ? "%%" : *p == '$' ? "$$" : NULL;
        size_t n = esc ? 2 : 1;
        if (*len + n + 2 >= size)
            return -1;
        if (esc)
            memcpy(buf + *len, esc, 2);
        else
            buf[*len] = (char)*p;
        *len += n;
    }
    buf[(*len)++] = '"';
    buf[*len] = '\0';
    return 0;
}

/* Run argv (looked up on PATH) and wait: its exit status, -1 when it could
 * not run at all (errno ENOENT: not installed). */
static int run_program(char *const argv[])
{
    pid_t pid;
    int err = posix_spawnp(&pid, argv[0], NULL, NULL, argv, environ);
    if (err != 0) {
        errno = err;
        return -1;
    }
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

static void print_undo(const char *unit, const char *env, int enabled)
{
    printf("to undo:\n");
    if (enabled)
        printf("  systemctl --user disable --now " UNIT_NAME "\n");
    printf("  rm %s %s\n", unit, env);
    if (enabled)
        printf("  systemctl --user daemon-reload\n");
}

/* Is argv[i] an option this copy drops (cpu_limit: --cpu-limit too)?
 * *skip: how many words it takes. */
static int dropped(int argc, char **argv, int i, int cpu_limit, int *skip)
{
    const char *a = argv[i];
    *skip = 1;
    if (!strcmp(a, "--install-service") || !strncmp(a, "--token=", 8) ||
        (cpu_limit && !strncmp(a, "--cpu-limit=", 12)))
        return 1;
    if (!strcmp(a, "--token") || (cpu_limit && !strcmp(a, "--cpu-limit"))) {
        *skip = i + 1 < argc ? 2 : 1;
        return 1;
    }
    return 0;
}

int ar_cli_install_service(int argc, char **argv, const char *token, const char *market, double grace_s,
                           int cpu_limit)
{
    const char *xdg = getenv("XDG_CONFIG_HOME"), *home = getenv("HOME");
    char config[PATH_MAX], unit_dir[PATH_MAX + 32], env_dir[PATH_MAX + 32], unit[PATH_MAX + 64],
        env_path[PATH_MAX + 64];
    /* the XDG rule: a relative $XDG_CONFIG_HOME is to be ignored */
    if (xdg && xdg[0] == '/')
        snprintf(config, sizeof config, "%s", xdg);
    else if (home && home[0] == '/')
        snprintf(config, sizeof config, "%s/.config", home);
    else {
        ar_cli_error(CMD, "--install-service: neither $XDG_CONFIG_HOME nor $HOME is an absolute path: "
                          "cannot tell where systemd looks for your units");
        return 1;
    }
    snprintf(unit_dir, sizeof unit_dir, "%s/systemd/user", config);
    snprintf(env_dir, sizeof env_dir, "%s/arceus", config);
    snprintf(unit, sizeof unit, "%s/" UNIT_NAME, unit_dir);
    snprintf(env_path, sizeof env_path, "%s/provide.env", env_dir);

    for (const unsigned char *p = (const unsigned char *)token; *p; p++)
        if (*p <= 0x20 || *p == 0x7f || *p == '"' || *p == '\'' || *p == '\\') {
            ar_cli_error(CMD, "--install-service: the token has a character an environment file cannot "
                              "hold (a token from arceus market add-account has none)");
            return 2;
        }

    char exe[PATH_MAX], cwd[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        ar_cli_error(CMD, "--install-service: cannot find this program's own path: %s", strerror(errno));
        return 1;
    }
    exe[n] = '\0';
    if (!getcwd(cwd, sizeof cwd)) {
        ar_cli_error(CMD, "--install-service: cannot read the current folder: %s", strerror(errno));
        return 1;
    }

    /* --cpu-limit PCT under 100: systemd holds it, as the unit's cgroup's
     * cpu.max (CPUQuota=, whose percent is of one CPU: PCT% of the machine
     * is PCT x its online CPUs). ExecStart= then goes without it: the
     * provider's own limit would find the cgroup shared with nothing and
     * write the same cpu.max, or, where it could not, duty-cycle under the
     * quota and so hold the provider twice. */
    char quota[96] = "";
    int quota_pct = cpu_limit > 0 && cpu_limit < 100;
    if (quota_pct) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        if (cpus < 1)
            cpus = 1;
        snprintf(quota, sizeof quota, "CPUQuota=%ld%%\n", (long)cpu_limit * cpus);
    }

    char exec[8192];
    size_t len = 0;
    exec[0] = '\0';
    int ok = append_word(exec, sizeof exec, &len, exe) == 0 && append_word(exec, sizeof exec, &len, CMD) == 0;
    for (int i = 1, skip = 1; ok && i < argc; i += skip)
        if (!dropped(argc, argv, i, quota_pct, &skip))
            ok = append_word(exec, sizeof exec, &len, argv[i]) == 0;
    if (!ok) {
        ar_cli_error(CMD, "--install-service: the options are too long or hold control characters");
        return 2;
    }

    /* the unit file; the market's address is named in its description
     * only when it holds nothing systemd would read as a specifier */
    char desc[300] = "the market";
    if (strlen(market) < sizeof desc - 16 && strspn(market, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                            "0123456789.:-_[]") == strlen(market))
        snprintf(desc, sizeof desc, "the market at %s", market);
    char unit_text[sizeof exec + 3 * PATH_MAX + 1024], env_text[512];
    int ulen = snprintf(unit_text, sizeof unit_text,
             "# Written by arceus provide --install-service. Undo: systemctl --user disable --now "
             UNIT_NAME ", then remove this file and %s.\n"
             "[Unit]\n"
             "Description=Arceus provider: rent this machine out through %s\n"
             "Documentation=man:arceus-provide(1)\n"
             "After=network-online.target\n"
             "Wants=network-online.target\n"
             "\n"
             "[Service]\n"
             "Type=simple\n"
             "EnvironmentFile=%s\n"
             "WorkingDirectory=%s\n"
             "ExecStart=%s\n"
             "%s"
             "Restart=on-failure\n"
             "RestartSec=30\n"
             /* stopping leaves gracefully (--grace): systemd waits for it */
             "TimeoutStopSec=%d\n"
             "\n"
             "[Install]\n"
             "WantedBy=default.target\n",
             env_path, desc, env_path, cwd, exec + 1, quota, (int)ceil(grace_s) + 30);
    if (ulen < 0 || (size_t)ulen >= sizeof unit_text) {
        ar_cli_error(CMD, "--install-service: the unit would be too long");
        return 2;
    }
    snprintf(env_text, sizeof env_text, "# the account token of arceus provide (" UNIT_NAME ")\nARCEUS_TOKEN=%s\n",
             token);

    if (make_dirs(unit_dir) != 0 || make_dirs(env_dir) != 0) {
        ar_cli_error(CMD, "--install-service: cannot create %s: %s", unit_dir, strerror(errno));
        return 1;
    }
    if (write_file(env_path, env_text, 0600) != 0) {
        ar_cli_error(CMD, "--install-service: cannot write %s: %s", env_path, strerror(errno));
        return 1;
    }
    if (write_file(unit, unit_text, 0644) != 0) {
        ar_cli_error(CMD, "--install-service: cannot write %s: %s", unit, strerror(errno));
        unlink(env_path);
        return 1;
    }
    printf("arceus provide: wrote %s\n", unit);
    printf("arceus provide:   ExecStart=%s\n", exec + 1);
    if (quota_pct)
        printf("arceus provide:   %.*s (--cpu-limit %d: %d%% of the machine, held by systemd through the "
               "service's cgroup rather than repeated in ExecStart)\n",
               (int)strcspn(quota, "\n"), quota, cpu_limit, cpu_limit);
    printf("arceus provide: wrote %s (mode 0600: the account token, kept out of the unit)\n", env_path);
    fflush(stdout);

    char *reload[] = {"systemctl", "--user", "daemon-reload", NULL};
    char *enable[] = {"systemctl", "--user", "enable", "--now", UNIT_NAME, NULL};
    const char *step = "daemon-reload";
    int rc = run_program(reload);
    if (rc < 0 && errno == ENOENT) {
        ar_cli_error(CMD, "--install-service: systemctl is not on PATH (this system does not run systemd, "
                          "or not for you): the unit is written but not enabled. Where systemd runs, enable "
                          "it with: systemctl --user daemon-reload && systemctl --user enable --now " UNIT_NAME
                          "; or start arceus provide some other way.");
        print_undo(unit, env_path, 0);
        fflush(stdout);
        return 1;
    }
    if (rc == 0) {
        printf("arceus provide: ran systemctl --user daemon-reload\n");
        fflush(stdout);
        step = "enable --now " UNIT_NAME;
        rc = run_program(enable);
    }
    if (rc != 0) {
        char why[128];
        if (rc < 0)
            snprintf(why, sizeof why, "%s", strerror(errno));
        else
            snprintf(why, sizeof why, "exit status %d", rc);
        ar_cli_error(CMD, "--install-service: systemctl --user %s failed (%s): the unit is written but not "
                          "enabled; systemctl said why above. Is your user's systemd running (a login "
                          "session, or loginctl enable-linger $USER)?",
                     step, why);
        print_undo(unit, env_path, 1);
        fflush(stdout);
        return 1;
    }
    printf("arceus provide: ran systemctl --user enable --now " UNIT_NAME ": it runs now and at every login\n");
    printf("arceus provide: its log: journalctl --user -u " UNIT_NAME "; its state: systemctl --user status "
           UNIT_NAME "\n");
    printf("arceus provide: to keep it running while you are logged out: loginctl enable-linger $USER\n");
    print_undo(unit, env_path, 1);
    return 0;
}
