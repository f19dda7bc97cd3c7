"""Keep OpenBLAS to one thread while training on a small shared CPU.

Measured on 2 cores shared with other jobs (load average 4-5), one step of the
`tiny` preset (32 x 128 tokens) took 5.3 s with OpenBLAS's default threads and
0.44 s with one BLAS thread (docs/training.md): at these matrix sizes
(4096 x 128 x 512) BLAS threads spin-wait for cores that the Numba kernels and
other processes hold. So the trainer asks every OpenBLAS library loaded in the
process for one thread, through its own C entry point (what threadpoolctl does,
without the dependency). The environment variable OPENBLAS_NUM_THREADS only
works before numpy is imported, too late for a `gma-np` subcommand.

On a platform where no OpenBLAS is found (macOS Accelerate, MKL), nothing changes.
"""

import ctypes
import os

# The names OpenBLAS builds export for openblas_set_num_threads: plain, 64-bit
# integer interface, and the scipy-openblas wheels' prefixed ones.
_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_")


def _loaded_openblas():
    """Paths of the OpenBLAS shared libraries mapped into this process (Linux), else []."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isfile(p))


def limit_blas_threads(n=1):
    """Set every loaded OpenBLAS to n threads. Returns the number of libraries changed."""
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded first)
    changed = 0
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                changed += 1
                break
    return changed
