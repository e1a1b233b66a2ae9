/* The market's web dashboard (`arceus market --http HOST:PORT`): a JSON API
 * over the market's database and the page that draws it (web/, embedded in
 * the binary at build time), served by libmicrohttpd from its own thread.
 *
 * The dashboard reads the database through its own connection (SQLite in WAL
 * mode: its reads never wait for the market's writes, nor the market's RPCs
 * for its reads). The overview is public; everything that belongs to an
 * account needs that account's token (Authorization: Bearer TOKEN): 401
 * without a valid one, 403 for another account's job or ledger. The API is
 * described in README.md. */
#ifndef AR_MARKET_HTTP_H
#define AR_MARKET_HTTP_H

#include <stddef.h>

typedef struct ar_http ar_http;

/* Serve the dashboard of the market database at db_path on `listen`
 * (HOST:PORT, port 0 picks a free one; *addr gets HOST:PORT with the real
 * port). offline_after_s is the market's: the page says how long a silent
 * provider stays online. */
int ar_http_start(const char *listen, const char *db_path, int offline_after_s, ar_http **out,
                  char *addr, size_t addr_size);
/* Stop serving (waits for the requests in flight) and close the database. */
void ar_http_stop(ar_http *h);

/* One file of the page (web/), embedded by scripts/embed-web.sh. */
typedef struct {
    const char *path; /* "/index.html" */
    const char *type; /* its Content-Type */
    const unsigned char *data;
    size_t size;
} ar_web_file;

/* The embedded files, ended by one whose path is NULL. */
extern const ar_web_file ar_web_files[];

#endif
