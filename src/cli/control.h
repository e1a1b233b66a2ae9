/* The local control socket of arceus provide (control.c).
 *
 * `arceus provide --leave` asks the provider running on this machine to
 * leave gracefully and stop, and prints what it does, line by line, until
 * it has stopped. The provider listens on a Unix socket that only its own
 * user may use: in a directory of that user's that no one else may enter
 * ($XDG_RUNTIME_DIR, or /tmp/arceus-UID, made 0700 and checked), the socket
 * itself 0600, and every peer's user id checked (SO_PEERCRED) before a byte
 * is read. One provider holds a path at a time (a lock file beside it): a
 * second one started with the same path warns and runs without it.
 *
 * The protocol: the client sends the line "leave"; the provider answers
 * lines of text ("leaving: ...", "left: ...", "stopped") and closes the
 * connection as it exits. */
#ifndef AR_CLI_CONTROL_H
#define AR_CLI_CONTROL_H

#include <stddef.h>

#define AR_CONTROL_MAX_CLIENTS 8

typedef struct {
    int listen_fd, lock_fd; /* -1: none */
    char path[108];         /* a sockaddr_un's sun_path */
    int clients[AR_CONTROL_MAX_CLIENTS]; /* connections that asked to leave: told what happens */
    int nclients;
} ar_control;

/* The default path: $XDG_RUNTIME_DIR/arceus-provide.sock, else
 * /tmp/arceus-UID/provide.sock (the directory made 0700 if missing). 0, or
 * -1 with why on stderr (a directory another user could enter). */
int ar_control_default_path(char *out, size_t size);

/* Listen on `path`. 0: listening; 1: another provider holds it (warned on
 * stderr; c->listen_fd is -1 and the provider runs without it); -1: an
 * error (on stderr). */
int ar_control_open(ar_control *c, const char *path);

/* Takes the connections waiting, at most timeout_ms for the first: 1 when
 * one of them asked to leave (it is kept, to be told what happens), else
 * 0. A peer of another user, or one that sends anything else, is answered
 * with an error line and closed. */
int ar_control_poll(ar_control *c, int timeout_ms);

/* One line to every connection that asked to leave (never blocks: a client
 * that does not read loses lines). */
void ar_control_say(ar_control *c, const char *line);

/* Closes the connections and the socket, removes it, releases the lock. */
void ar_control_close(ar_control *c);

/* The client: asks the provider at `path` to leave, prints its lines on
 * stdout until it closes. The exit code: 0 when it said it stopped, 1
 * otherwise (no provider there: said on stderr). */
int ar_control_leave(const char *path);

#endif
