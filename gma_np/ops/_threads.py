"""How many threads a kernel call gets: Numba's setting for large work, one for small work.

The kernels are parallel over sequences (prange over batch x heads). The
number of threads is Numba's: numba.set_num_threads(n) in the calling thread,
or the NUMBA_NUM_THREADS environment variable before the first import (BLAS
has its own: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS). Below
gma_np._numerics.PARALLEL_MIN_WORK multiply-adds, a call runs on one thread
instead: waking the pool would cost more than the work (docs/performance.md).
"""

import contextlib
import os

import numba

from gma_np._numerics import PARALLEL_MIN_WORK

# ---------------------------------------------------------------------------------------
# Idle OpenMP workers.
#
# Numba's default threading layer is OpenMP (libgomp). After each parallel kernel its
# workers spin-wait before they sleep: GOMP_SPINCOUNT = 300,000 pause instructions,
# ~10 ms on CPUs where a pause costs ~100 cycles. gma_np alternates parallel Numba
# kernels (the scans, the softmax backward) with work on Python threads (the streams
# of GEMM blocks below), so a spinning worker took the second core from a stream:
# B=1 H=4 N=1024 d=K=e=64 float32, 2 threads, medians of 7, gma_backward 17.6-23.2 ms
# with spinning workers, 11.7-12.3 ms with OMP_WAIT_POLICY=PASSIVE (workers sleep at
# once; waking them costs microseconds, a few times per call). libgomp reads the
# variable once, when it is loaded: _quiet_openmp_workers sets it (unless the user set
# it), has Numba load its threading layer, and restores the environment, so that it
# applies to Numba's OpenMP pool only, not to libraries loaded later. It runs at the
# first call that may go parallel, not at import: torch bundles a libgomp with the
# same soname, and a torch imported after the quieting would share the passive pool.
# (The other way round, torch imported before that first call, Numba shares torch's
# libgomp and its spinning setting: gma_np is then as before, 34-37 ms in the case
# above.)
# ---------------------------------------------------------------------------------------

_QUIETED = []


def _quiet_openmp_workers():
    """Once per process, before Numba's first parallel kernel: see the comment above."""
    if _QUIETED:
        return
    _QUIETED.append(True)
    if "OMP_WAIT_POLICY" in os.environ:                 # the user's choice stands
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from numba.np.ufunc import parallel
        parallel._launch_threads()                      # loads the threading layer (libgomp)
    except (ImportError, AttributeError, RuntimeError):
        pass                                            # another Numba: its default applies
    finally:
        del os.environ["OMP_WAIT_POLICY"]


@contextlib.contextmanager
def threads_for(work):
    """Run the body on one thread if `work` (multiply-adds) is small, else unchanged."""
    _quiet_openmp_workers()
    n = numba.get_num_threads()
    if work >= PARALLEL_MIN_WORK or n == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)


# ---------------------------------------------------------------------------------------
# BLAS threads of the small per-block GEMMs of the routing.
#
# The routing runs one GEMM per block of ROUTING_BLOCK tokens per (batch, head):
# thousands of small GEMMs per call. A multi-threaded OpenBLAS wakes its pool
# for each of them; measured on the loaded 2-core machine (causal fwd+bwd,
# N=8192, float32) that took 5.4 s against 0.63 s with OpenBLAS on one thread.
# blas_single_thread() sets the OpenBLAS that NumPy loaded to one thread for
# the duration of a block loop and restores it after, through OpenBLAS's own
# C API (found the way threadpoolctl finds it: the loaded libraries in
# /proc/self/maps). Where that is not possible (another BLAS, another OS) it
# does nothing, and the BLAS's own setting applies.
# ---------------------------------------------------------------------------------------

_OPENBLAS = []          # [(set, get)] once found; [None] if not found


def _find_openblas():
    if _OPENBLAS:
        return _OPENBLAS[0]
    found = None
    try:
        import ctypes
        import numpy  # noqa: F401  (its BLAS must be loaded to be found)
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()
                            and line.split()[-1].startswith("/")})
        for path in paths:
            lib = ctypes.CDLL(path)
            for suffix in ("64_", "", "_64"):
                for prefix in ("scipy_openblas", "openblas"):
                    set_, get_ = (getattr(lib, f"{prefix}_{op}_num_threads{suffix}", None)
                                  for op in ("set", "get"))
                    if set_ is not None and get_ is not None:
                        set_.argtypes, get_.restype = [ctypes.c_int], ctypes.c_int
                        found = (set_, get_)
                        break
                if found:
                    break
            if found:
                break
    except (OSError, AttributeError):
        found = None
    _OPENBLAS.append(found)
    return found


@contextlib.contextmanager
def blas_single_thread():
    """Run the body with NumPy's OpenBLAS on one thread (if it can be found), then restore."""
    api = _find_openblas()
    if api is None:
        yield
        return
    set_, get_ = api
    n = get_()
    if n <= 1:
        yield
        return
    set_(1)
    try:
        yield
    finally:
        set_(n)


# ---------------------------------------------------------------------------------------
# Streams of routing blocks on Python threads.
#
# The block loop of the routing (small GEMMs and serial fused kernels, all of which
# release the GIL) is split into BLOCK_STREAMS interleaved streams of blocks:
# block i goes to stream i % BLOCK_STREAMS. The streams run concurrently on
# Python threads when Numba has more than one thread (numba.get_num_threads() in
# the calling thread, so threads_for and numba.set_num_threads apply), else one
# after the other. Each stream's sums are its own and are added in stream order
# at the end, so the results are bit for bit the same whatever the thread count.
# ---------------------------------------------------------------------------------------

_POOL = []


def run_streams(fn, n_streams):
    """[fn(0), ..., fn(n_streams - 1)]: concurrently if Numba has > 1 thread, else in order."""
    _quiet_openmp_workers()
    threads = min(n_streams, numba.get_num_threads())
    if threads <= 1:
        return [fn(s) for s in range(n_streams)]
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL.append(ThreadPoolExecutor(max_workers=n_streams, thread_name_prefix="gma_np"))
    return list(_POOL[0].map(fn, range(n_streams)))


def sum_in_order(terms):
    """terms[0] + terms[1] + ..., added left to right: the sums over streams or blocks are
    always taken in the same order, so that they are bit for bit the same whatever the
    thread count."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total
