/* A process that exits while two threads are busy inside OpenSSL, as arceus
 * does when SIGTERM comes while a handler thread makes a session or digests a
 * token. Run by test_net (net/a_process_exits_cleanly_while_threads_use_openssl);
 * a separate program because Criterion's own start-up initialises OpenSSL (via
 * libgit2) before any test could, and it is the first initialisation that
 * decides whether OpenSSL tears itself down at exit. */
#include "core/core.h"
#include "net/net.h"

#include <openssl/rand.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>

static void *busy_main(void *arg)
{
    (void)arg;
    unsigned char b[32] = {0};
    for (;;) {
        RAND_bytes(b, sizeof b);
        SHA256(b, sizeof b, b);
    }
    return NULL;
}

int main(void)
{
    if (ar_net_process_init() != AR_OK) {
        fprintf(stderr, "helper_exit_race: %s\n", ar_last_error());
        return 3;
    }
    for (int i = 0; i < 2; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, busy_main, NULL) != 0)
            return 4;
    }
    struct timespec pause = {0, 20 * 1000 * 1000};
    nanosleep(&pause, NULL);
    return 0; /* exit runs the atexit handlers with both threads still busy */
}
