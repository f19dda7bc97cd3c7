"""The C allocator during training: freed blocks kept for the next step, not given back.

A training step allocates the same few hundred arrays every step and frees them by its
end. glibc's malloc gives large freed blocks back to the system (munmap above its mmap
threshold, a trim of the heap top above its trim threshold), and the next step's arrays
then arrive as fresh pages, each zeroed by the kernel on first touch: minor page faults.
The main thread's arena raises its thresholds as it goes (glibc's dynamic threshold), but
the trainer's shards allocate on threads of their own (gma_np.train.loop, BATCH_SHARDS),
from arenas whose heaps shrink again whenever their top is free. Measured, tiny preset,
medians of 9 steps in one process (load ~1): the sharded step took ~10,500 minor faults and
33-41 ms of system time a step with glibc's defaults, and 5 to 415 faults and 3 ms with the
thresholds below, its wall time 130-151 -> 112-119 ms (the step on one thread: 0 faults
either way).

keep_freed_memory() fixes both thresholds (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
blocks up to MMAP_THRESHOLD come from the heaps and stay there when freed, and a heap is
trimmed only when TRIM_THRESHOLD of it is free at its top. The price: the process keeps the
memory of its largest step until it exits. It is process-wide and glibc has no call to
read the settings back, so it cannot be undone; train() applies it (docs/training.md,
"Two shards of the batch"). Elsewhere than glibc it does nothing.
"""

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on a 64-bit system (DEFAULT_MMAP_THRESHOLD_MAX,
# 4 * 1024 * 1024 * sizeof(long)): larger blocks (none in the presets' steps: the largest,
# the small preset's (8192, 768) float32 activations, are 24 MiB) still come from mmap.
MMAP_THRESHOLD = 32 * 2 ** 20

# Free memory at a heap's top before it is given back: more than a step of the presets holds.
TRIM_THRESHOLD = 2 ** 30

_APPLIED = []


def keep_freed_memory():
    """Once per process, on glibc: the thresholds above (see the module docstring).
    Returns True if they are in force, False where there is no glibc mallopt."""
    if _APPLIED:
        return _APPLIED[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):           # not glibc (musl has no mallopt)
            ok = False
    _APPLIED.append(ok)
    return ok
