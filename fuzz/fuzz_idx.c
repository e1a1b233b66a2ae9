/* libFuzzer harness: the IDX reader (src/data/idx.c), plain and gzip'd (a
 * gzip stream is recognised by its magic, so the fuzzer reaches both). The
 * reader takes a path: the input is written to an in-memory file. */
#include "core/core.h"
#include "data/data.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("fuzz-idx", 0);
        if (fd < 0)
            abort();
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size)
        abort();
    ar_idx idx;
    if (ar_idx_load(path, &idx) == AR_OK) {
        size_t n = 1;
        for (int i = 0; i < idx.ndim; i++)
            n *= idx.dims[i];
        if (n != idx.count)
            abort();
        volatile uint8_t last = idx.data[idx.count - 1]; /* the whole payload is there */
        (void)last;
        ar_idx_free(&idx);
    }
    return 0;
}
