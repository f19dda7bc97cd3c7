"""Where a sweep's jobs run: Dask distributed, an embedded LocalCluster or a cluster by address.

    with open_client(workers=2) as (client, about):            # embedded: 2 worker processes
    with open_client(scheduler="tcp://host:8786") as (client, about)   # an existing cluster

The embedded cluster is a LocalCluster of worker processes (default: one per core),
one thread each, listening on the loopback interface only. Each job runs on one core,
so every thread pool under it is set to one thread in the worker:

- BLAS (OpenBLAS, MKL): the nanny's pre-spawn environment sets OMP_NUM_THREADS,
  MKL_NUM_THREADS and OPENBLAS_NUM_THREADS to 1 (Dask's defaults), and each job
  limits the loaded libraries with threadpoolctl as well (`job_threads`), which
  also covers a worker of an existing cluster started without those variables.
- Numba: Dask sets nothing. NUMBA_NUM_THREADS=1 is set in each local worker process
  as it starts (the nanny's `env`, applied inside the worker, never in this process:
  the pre-spawn environment would be written into the client's own os.environ, and
  Numba refuses a NUMBA_NUM_THREADS that changes after its pool has started), and
  each job runs under numba.set_num_threads(1) in its thread (`job_threads`), which
  is what counts on a cluster whose workers were started without it.

The Numba cache: gma_np's kernels are @njit(cache=True), so Numba keeps the compiled
code next to the sources, in the package's __pycache__ folders, whenever they are
writable (an editable or user install): every worker process on the machine loads
the same files, and only the first process ever compiles. Where the package folder
is read-only, Numba falls back to its per-user cache folder, which the workers share
too. NUMBA_CACHE_DIR, when set, overrides both and is passed to the local workers
(they inherit the environment). `numba_cache_location()` says which applies; the
sweep prints it. A remote cluster's workers use their own machines' caches.
"""

import contextlib
import logging
import os

# Set in every local worker process as it starts, before a job imports Numba (the BLAS
# variables, OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS = 1, are Dask's own
# pre-spawn defaults).
WORKER_ENVIRONMENT = {"NUMBA_NUM_THREADS": "1"}
INSTALL_HINT = 'pip install "gma_np[sweep]"'
# Seconds to wait for an existing scheduler to answer.
CONNECT_TIMEOUT_S = 30


class DaskMissing(ImportError):
    """Dask distributed is not installed."""


def require_distributed():
    """The `distributed` module, or DaskMissing with the install command."""
    try:
        import distributed
    except ImportError:
        raise DaskMissing(f"Dask distributed is not installed: {INSTALL_HINT}") from None
    return distributed


def default_workers():
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:               # not Linux
        return max(1, os.cpu_count() or 1)


def numba_cache_location():
    """Where the workers' Numba cache is: (kind, path) with kind "NUMBA_CACHE_DIR",
    "package __pycache__" or "Numba's per-user cache"."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return "NUMBA_CACHE_DIR", os.environ["NUMBA_CACHE_DIR"]
    import gma_np
    package = os.path.dirname(os.path.abspath(gma_np.__file__))
    kernels = os.path.join(package, "mixers", "gma")
    folder = kernels if os.path.isdir(kernels) else package
    if os.access(folder, os.W_OK):
        return "package __pycache__", os.path.join(folder, "__pycache__")
    return "Numba's per-user cache", os.path.expanduser("~/.cache")


@contextlib.contextmanager
def job_threads():
    """Around a job: Numba and BLAS on one thread (module docstring); the counts before
    come back after, so a job run in the calling process (as the tests do) leaves it
    as it was."""
    import numba
    import threadpoolctl
    from gma_np._threads import set_numba_threads
    before = numba.get_num_threads()
    set_numba_threads(1)
    try:
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(before)


def describe_worker():
    """Run on a worker (client.run): its process id and the thread counts a job gets."""
    import numba
    import threadpoolctl
    with job_threads():
        blas = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                if lib.get("user_api") == "blas"]
        numba_threads = numba.get_num_threads()
    return {"pid": os.getpid(), "numba_threads": numba_threads,
            "blas_threads": max(blas) if blas else 1,
            "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
            "numba_cache": numba_cache_location()}


@contextlib.contextmanager
def open_client(workers=None, scheduler=None):
    """Context manager: (Client, description line) of an embedded LocalCluster of
    `workers` processes (default: one per core), or of the scheduler at `scheduler`.
    The local cluster is closed on exit, whatever happened; an existing one is left
    running (only the client disconnects)."""
    require_distributed()
    from distributed import Client, LocalCluster
    cluster = None
    if scheduler is not None:
        client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        about = f"the Dask cluster at {scheduler}"
    else:
        n = workers or default_workers()
        # on the loopback interface only, the HTTP server (health routes, and the
        # dashboard when bokeh is installed) on a free port: several sweeps may run
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address="127.0.0.1:0",
                               silence_logs=logging.ERROR, env=dict(WORKER_ENVIRONMENT))
        client = Client(cluster)
        kind, path = numba_cache_location()
        about = (f"a local Dask cluster of {n} worker process{'es' if n > 1 else ''}, one "
                 f"thread each; Numba cache: {kind} ({path})")
    try:
        yield client, about
    finally:
        try:
            client.close()
        finally:
            if cluster is not None:
                cluster.close()
