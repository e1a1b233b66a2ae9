/* For the fuzz harnesses that take a gRPC message: the input's first byte
 * is the slice length (0: one slice), the rest the message, cut into slices
 * of that length (the last slice takes the remainder past 64), as gRPC may
 * deliver it. Returns NULL for an empty input; else a byte buffer to
 * destroy. */
#ifndef AR_FUZZ_SLICES_H
#define AR_FUZZ_SLICES_H

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <stddef.h>
#include <stdint.h>

static inline grpc_byte_buffer *fuzz_sliced_message(const uint8_t *data, size_t size)
{
    if (size < 1)
        return NULL;
    size_t step = data[0] ? data[0] : size;
    data++;
    size--;
    enum { MAX_SLICES = 64 };
    grpc_slice slices[MAX_SLICES];
    size_t n = 0;
    for (size_t at = 0; at < size || n == 0;) {
        size_t take = size - at < step || n == MAX_SLICES - 1 ? size - at : step;
        slices[n++] = grpc_slice_from_copied_buffer((const char *)data + at, take);
        at += take;
    }
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(slices, n);
    for (size_t i = 0; i < n; i++)
        grpc_slice_unref(slices[i]);
    return bb;
}

#endif
