/* arceus provide's local control socket (control.h). */
#include "cli/control.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

/* A request is one short line; a peer gets this long to send it. */
#define REQUEST_MAX 64
#define REQUEST_WAIT_S 1

int ar_control_default_path(char *out, size_t size)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (xdg && xdg[0] == '/') {
        /* the user's own runtime directory (0700, made by the login) */
        if ((size_t)snprintf(out, size, "%s/arceus-provide.sock", xdg) >= size ||
            strlen(out) >= sizeof((struct sockaddr_un *)0)->sun_path) {
            fprintf(stderr, "arceus provide: $XDG_RUNTIME_DIR is too long for a socket path: give --control PATH\n");
            return -1;
        }
        return 0;
    }
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/arceus-%u", (unsigned)geteuid());
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "arceus provide: cannot make %s: %s\n", dir, strerror(errno));
        return -1;
    }
    /* /tmp is everyone's: the directory must be ours and closed to others,
     * or another user could put a socket of theirs where ours is looked for */
    struct stat st;
    if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
        fprintf(stderr, "arceus provide: %s is not a directory of this user's that no one else may enter: "
                        "give --control PATH\n", dir);
        return -1;
    }
    snprintf(out, size, "%s/provide.sock", dir);
    return 0;
}

int ar_control_open(ar_control *c, const char *path)
{
    memset(c, 0, sizeof *c);
    c->listen_fd = c->lock_fd = -1;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    char lock[sizeof a.sun_path + 8];
    if (strlen(path) >= sizeof a.sun_path) {
        fprintf(stderr, "arceus provide: --control %s: at most %zu characters\n", path, sizeof a.sun_path - 1);
        return -1;
    }
    snprintf(c->path, sizeof c->path, "%s", path);
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    snprintf(lock, sizeof lock, "%s.lock", path);
    /* one provider holds a path: the lock is its, for as long as it runs
     * (the system drops it with the process, however it ends) */
    c->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (c->lock_fd < 0) {
        fprintf(stderr, "arceus provide: control socket: cannot open %s: %s\n", lock, strerror(errno));
        return -1;
    }
    if (flock(c->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        close(c->lock_fd);
        c->lock_fd = -1;
        if (errno != EWOULDBLOCK) {
            fprintf(stderr, "arceus provide: control socket: cannot lock %s: %s\n", lock, strerror(errno));
            return -1;
        }
        fprintf(stderr, "arceus provide: warning: another arceus provide holds the control socket %s: "
                        "`arceus provide --leave` reaches that one; give this one --control PATH\n", path);
        return 1;
    }
    /* a socket left by a provider that died is ours to replace */
    if (unlink(path) != 0 && errno != ENOENT) {
        fprintf(stderr, "arceus provide: control socket: cannot remove the old %s: %s\n", path, strerror(errno));
        ar_control_close(c);
        return -1;
    }
    c->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (c->listen_fd < 0 || bind(c->listen_fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        chmod(path, 0600) != 0 || listen(c->listen_fd, AR_CONTROL_MAX_CLIENTS) != 0) {
        fprintf(stderr, "arceus provide: control socket %s: %s\n", path, strerror(errno));
        ar_control_close(c);
        return -1;
    }
    return 0;
}

static void answer(int fd, const char *line)
{
    char buf[256];
    int n = snprintf(buf, sizeof buf, "%s\n", line);
    if (n > 0 && send(fd, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
        return; /* a client that went: nothing to tell */
}

/* One accepted connection: 1 when it asked to leave (kept), else 0 (closed). */
static int take(ar_control *c, int fd)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    /* the user is checked before anything is read */
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != geteuid()) {
        answer(fd, "error: this provider belongs to another user");
        close(fd);
        return 0;
    }
    struct timeval tv = {.tv_sec = REQUEST_WAIT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char req[REQUEST_MAX + 1];
    size_t n = 0;
    while (n < REQUEST_MAX && !memchr(req, '\n', n)) {
        ssize_t got = recv(fd, req + n, REQUEST_MAX - n, 0);
        if (got <= 0)
            break;
        n += (size_t)got;
    }
    req[n] = '\0';
    char *nl = strchr(req, '\n');
    if (nl)
        *nl = '\0';
    if (!nl || strcmp(req, "leave") != 0) {
        answer(fd, "error: the one request is \"leave\"");
        close(fd);
        return 0;
    }
    if (c->nclients == AR_CONTROL_MAX_CLIENTS) {
        answer(fd, "error: too many connections; the provider is leaving already");
        close(fd);
        return 1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    c->clients[c->nclients++] = fd;
    return 1;
}

int ar_control_poll(ar_control *c, int timeout_ms)
{
    if (c->listen_fd < 0) {
        if (timeout_ms > 0)
            poll(NULL, 0, timeout_ms);
        return 0;
    }
    struct pollfd p = {.fd = c->listen_fd, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) <= 0)
        return 0;
    int asked = 0;
    for (;;) {
        int fd = accept4(c->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            break;
        asked |= take(c, fd);
    }
    return asked;
}

void ar_control_say(ar_control *c, const char *line)
{
    for (int i = 0; i < c->nclients; i++)
        answer(c->clients[i], line);
}

void ar_control_close(ar_control *c)
{
    for (int i = 0; i < c->nclients; i++)
        close(c->clients[i]);
    c->nclients = 0;
    if (c->listen_fd >= 0) {
        close(c->listen_fd);
        unlink(c->path);
    }
    if (c->lock_fd >= 0)
        close(c->lock_fd); /* (the lock file stays: removing it would race a new provider's lock) */
    c->listen_fd = c->lock_fd = -1;
}

int ar_control_leave(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) {
        fprintf(stderr, "arceus provide: --control %s: at most %zu characters\n", path, sizeof a.sun_path - 1);
        return 1;
    }
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        fprintf(stderr, "arceus provide: no provider answers on %s (%s): is one running? Give the --control "
                        "PATH it was started with\n", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return 1;
    }
    if (send(fd, "leave\n", 6, MSG_NOSIGNAL) != 6) {
        fprintf(stderr, "arceus provide: %s: %s\n", path, strerror(errno));
        close(fd);
        return 1;
    }
    /* its lines as they come, until it closes (as it exits) */
    FILE *f = fdopen(fd, "r");
    if (!f) {
        close(fd);
        return 1;
    }
    char line[512];
    int stopped = 0, error = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        stopped |= strcmp(line, "stopped") == 0;
        error |= strncmp(line, "error:", 6) == 0;
        printf("arceus provide: %s\n", line);
        fflush(stdout);
    }
    fclose(f);
    if (!stopped && !error)
        fprintf(stderr, "arceus provide: the provider closed the connection without saying it stopped\n");
    return stopped ? 0 : 1;
}
