/* The one place that knows which BLAS we link: OpenBLAS on Linux,
 * Accelerate on macOS. Everything else includes this header. */
#ifndef AR_BLAS_H
#define AR_BLAS_H

#ifdef __APPLE__
#include <Accelerate/Accelerate.h>
#else
#include <cblas.h>
#endif

void ar_blas_set_threads(int n);

#endif
