"""How many threads a kernel call gets: Numba's setting for large work, one for small work.

The kernels are parallel over sequences (prange over batch x heads). The
number of threads is Numba's: numba.set_num_threads(n) in the calling thread,
or the NUMBA_NUM_THREADS environment variable before the first import (BLAS
has its own: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS). Below
gma_np._numerics.PARALLEL_MIN_WORK multiply-adds, a call runs on one thread
instead: waking the pool would cost more than the work (docs/performance.md).
"""

import contextlib

import numba

from gma_np._numerics import PARALLEL_MIN_WORK


@contextlib.contextmanager
def threads_for(work):
    """Run the body on one thread if `work` (multiply-adds) is small, else unchanged."""
    n = numba.get_num_threads()
    if work >= PARALLEL_MIN_WORK or n == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)
