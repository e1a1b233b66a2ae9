/* Core utilities shared by every module: memory, random numbers, threads,
 * logging, timing. */
#ifndef AR_CORE_H
#define AR_CORE_H

#include "arceus.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- memory ------------------------------------------------------------ */

/* 64-byte aligned, zeroed allocation; NULL (with ar_last_error set) on failure
 * or when the size computation would overflow. Free with ar_free. */
void *ar_calloc(size_t count, size_t size);
void ar_free(void *p);

/* ---- random numbers ----------------------------------------------------- */

/* xoshiro256** generator; state is plain data so it can be checkpointed. */
typedef struct {
    uint64_t s[4];
} ar_rng;

void ar_rng_seed(ar_rng *r, uint64_t seed);
uint64_t ar_rng_next(ar_rng *r);
/* uniform in [0, 1) with 24 bits of precision */
float ar_rng_uniform(ar_rng *r);
/* uniform integer in [0, n) */
uint64_t ar_rng_below(ar_rng *r, uint64_t n);
/* standard normal (Box-Muller) */
float ar_rng_normal(ar_rng *r);

/* Stateless hash of (a, b, c) used for counter-based random streams such as
 * dropout masks: the same inputs give the same bits on every machine. */
uint64_t ar_hash3(uint64_t a, uint64_t b, uint64_t c);

/* ---- threads ------------------------------------------------------------ */

/* ar_set_threads/ar_get_threads are in arceus.h. BLAS and the element-wise
 * kernels share one OpenMP pool so the two never fight over the cores. */

/* ---- time and logging --------------------------------------------------- */

double ar_now(void); /* monotonic seconds */

enum { AR_LOG_DEBUG, AR_LOG_INFO, AR_LOG_WARN, AR_LOG_ERROR };
void ar_log_set_level(int level);
void ar_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- files -------------------------------------------------------------- */

/* Read a whole file; *out is NUL-terminated (not counted in *len). */
int ar_read_file(const char *path, char **out, size_t *len);
/* Create a folder and any missing parents (mkdir -p); fine if it exists. */
int ar_mkdir_p(const char *path);
/* Write atomically: temp file in the same folder, fsync, rename. */
int ar_write_file_atomic(const char *path, const void *data, size_t len);

#endif
