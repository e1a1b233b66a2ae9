#include "blas.h"

void ar_blas_set_threads(int n)
{
#ifdef __APPLE__
    (void)n; /* Accelerate manages its own threads */
#else
    openblas_set_num_threads(n);
#endif
}
