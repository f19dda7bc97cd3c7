"""Thread control of gma_np, all of it: the one module that sets Numba, BLAS or OpenMP threads.

- threads_for(work): a kernel call gets Numba's threads for large work, one for small.
  The kernels are parallel over sequences (prange over batch x heads); the number
  of threads is Numba's: numba.set_num_threads(n) in the calling thread, or the
  NUMBA_NUM_THREADS environment variable before the first import. Below
  gma_np._numerics.PARALLEL_MIN_WORK multiply-adds a call runs on one thread:
  waking the pool would cost more than the work (docs/performance.md).
- blas_threads(n), with_blas_threads(parameter): BLAS threads for a whole run
  (threadpoolctl's threadpool_limits, restored on exit); blas_single_thread():
  BLAS on one thread around an op's block loop, cheap enough to run per call.
- run_streams(fn, n), sum_in_order(terms): the block loops' streams on Python
  threads, and sums over them that are the same bit for bit at any thread count.
- run_shards(fn, n): the shards of a training batch, one Python thread each, every
  shard with its share of Numba's threads and BLAS on one thread.
- set_numba_threads(n): numba.set_num_threads after the quieting below.
- _quiet_openmp_workers(): Numba's OpenMP workers sleep when idle, which no
  library sets for one pool only (see below).
"""

import contextlib
import functools
import inspect
import os

import numba
import numpy as np
import threadpoolctl

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
# Numba's own numba.set_num_threads starts the pool as well, so a caller that sets
# the count before gma_np's first call gets the spinning pool: gma_np sets it through
# set_numba_threads, which quiets first. Measured, B=1 H=4 N=1024 d=K=e=64 float32
# fwd+bwd, 2 threads, in processes run in turn: 14.5-15.8 ms when the script only
# imported gma_np, 17.1-18.5 ms when it called numba.set_num_threads(2) first.
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


def set_numba_threads(n):
    """numba.set_num_threads(n), after _quiet_openmp_workers: Numba's first
    set_num_threads starts its thread pool, and a pool started before the quieting spins
    (the comment above). Every thread count gma_np and its benchmarks set goes through here."""
    _quiet_openmp_workers()
    numba.set_num_threads(n)


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
# BLAS threads.
#
# Two uses, both through threadpoolctl (which finds OpenBLAS, MKL, BLIS and FlexiBLAS
# among the loaded libraries and sets each through its own C API):
#
# - blas_threads(n), for a whole run: the trainer, `gma-np eval` and `gma-np sample`.
#   One step of the `tiny` preset (4096 x 128 by 128 x 512 products) took 5.3 s with
#   OpenBLAS's default threads and 0.44 s with one thread on 2 cores shared with other
#   jobs: the BLAS threads spin-wait for cores that the Numba kernels and other
#   processes hold. The environment variables (OPENBLAS_NUM_THREADS, ...) only work
#   before NumPy is imported, too late for a library or a subcommand.
#
# - blas_single_thread(), around the block loops of one op call: thousands of small
#   GEMMs per call, for which a multi-threaded BLAS wakes its pool each time (causal
#   fwd+bwd, N=8192, float32, loaded 2-core machine: 5.4 s against 0.63 s on one
#   thread). It runs once or more per op call, so its cost counts at small sizes:
#   threadpool_limits finds the libraries afresh on every call (~750 us measured,
#   against ~300 us for a whole bidirectional fwd+bwd at N = 37), while limit() on a
#   controller kept from the first call costs ~11 us. NumPy's BLAS, the one the block
#   GEMMs use, is loaded with NumPy, so it is among the libraries found then.
#
# Some libraries keep the limit per calling thread (MKL; OpenBLAS built with OpenMP),
# others per process (OpenBLAS with pthreads, the one in NumPy's wheels, which
# threadpoolctl lets one Python thread at a time control). So the limit is taken in
# every thread that runs block GEMMs: the op's own thread, around the loop, and each
# stream's worker inside it (run_streams). A process-wide limit is then set and
# restored by the op's thread, whose block encloses the workers'.
# ---------------------------------------------------------------------------------------

_BLAS = []    # [threadpoolctl controller of the BLAS libraries loaded at the first call]


def blas_single_thread():
    """Context manager: the BLAS libraries on one thread (in this thread) for the body.

    Applied at the call, restored at the end of the `with` block. Where every library
    is on one thread already (a training run, or a caller that set it), there is
    nothing to set or restore, and asking costs ~1.5 us instead of limit()'s ~11.
    """
    if not _BLAS:
        _BLAS.append(threadpoolctl.ThreadpoolController().select(user_api="blas"))
    controller = _BLAS[0]
    if all(lib.get_num_threads() in (1, None) for lib in controller.lib_controllers):
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


def blas_threads(n):
    """Every BLAS library loaded in the process on `n` threads (None: leave them alone).

    Applied at the call, as threadpoolctl's threadpool_limits (which it is): used as
    `with blas_threads(1): ...` the previous thread counts come back at the end of the
    block, whether it returns or raises; called alone, the limit stays for the rest of
    the process (what a command-line subcommand wants). The libraries are found afresh
    on each call, so one loaded since the last call is covered too.
    """
    if n is None:
        return contextlib.nullcontext()
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"blas_threads: expected an int >= 1 or None, got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"blas_threads: expected an int >= 1 or None, got {n}")
    return threadpoolctl.threadpool_limits(limits=int(n), user_api="blas")


def with_blas_threads(parameter):
    """Decorator: the function runs under blas_threads(<its argument `parameter`>).

    The caller's BLAS thread counts come back when the function returns or raises,
    so a Python caller of, say, train() is not left with single-threaded BLAS.
    """
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with blas_threads(bound.arguments[parameter]):
                return fn(*args, **kwargs)
        return run
    return decorate


# ---------------------------------------------------------------------------------------
# Streams of routing blocks on Python threads.
#
# The block loop of the routing (small GEMMs and serial fused kernels, all of which
# release the GIL) is split into BLOCK_STREAMS interleaved streams of blocks:
# block i goes to stream i % BLOCK_STREAMS. The streams run concurrently on
# Python threads when Numba has more than one thread (numba.get_num_threads() in
# the calling thread, so threads_for and numba.set_num_threads apply), else one
# after the other, each with BLAS on one thread. Each stream's sums are its own and
# are added in stream order at the end, so the results are bit for bit the same
# whatever the thread count.
# ---------------------------------------------------------------------------------------

_POOL = []


def _stream_in_worker(fn, s):
    with blas_single_thread():                          # per-thread BLAS limits: see above
        return fn(s)


def run_streams(fn, n_streams):
    """[fn(0), ..., fn(n_streams - 1)]: concurrently if Numba has > 1 thread, else in order.

    Called inside blas_single_thread(); each worker takes its own limit as well.
    """
    _quiet_openmp_workers()
    threads = min(n_streams, numba.get_num_threads())
    if threads <= 1:
        return [fn(s) for s in range(n_streams)]
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL.append(ThreadPoolExecutor(max_workers=n_streams, thread_name_prefix="gma_np"))
    return list(_POOL[0].map(functools.partial(_stream_in_worker, fn), range(n_streams)))


def sum_in_order(terms):
    """terms[0] + terms[1] + ..., added left to right: the sums over streams or blocks are
    always taken in the same order, so that they are bit for bit the same whatever the
    thread count."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


# ---------------------------------------------------------------------------------------
# Shards of a training batch on Python threads.
#
# The trainer cuts its batch into a fixed number of shards (gma_np.train.loop,
# BATCH_SHARDS) and runs each shard's forward and backward on a thread of its own,
# with the calling thread's Numba threads divided among the shards. Within an op the
# streams and pieces wait for each other dozens of times a step (every product, every
# row layer); whole shards meet only once, at the sum of their gradients. Which shards
# there are, and the order of that sum, depend on the batch only, so the gradients are
# the same bits whether the shards run concurrently or one after the other.
# ---------------------------------------------------------------------------------------

_SHARD_POOLS = {}                                       # n_shards -> ThreadPoolExecutor


def _shard_in_worker(fn, threads, i):
    before = numba.get_num_threads()                    # per thread: the pool's are reused
    numba.set_num_threads(threads)
    try:
        with blas_single_thread():
            return fn(i)
    finally:
        numba.set_num_threads(before)


def run_shards(fn, n_shards):
    """[fn(0), ..., fn(n_shards - 1)]: concurrently, one thread per shard, when Numba has
    at least two threads in the calling thread, else in order in the calling thread.

    Each shard runs with numba.get_num_threads() // n_shards Numba threads (at least
    one; its streams run in order when that is one) and BLAS on one thread."""
    _quiet_openmp_workers()
    total = numba.get_num_threads()
    if n_shards <= 1 or total <= 1:
        return [fn(i) for i in range(n_shards)]
    if n_shards not in _SHARD_POOLS:
        from concurrent.futures import ThreadPoolExecutor
        _SHARD_POOLS[n_shards] = ThreadPoolExecutor(max_workers=n_shards,
                                                    thread_name_prefix="gma_np_shard")
    work = functools.partial(_shard_in_worker, fn, max(1, total // n_shards))
    return list(_SHARD_POOLS[n_shards].map(work, range(n_shards)))
