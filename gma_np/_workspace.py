"""Scratch arrays that an op keeps from call to call: one per name and thread.

An op's large internal temporary (gma_backward's dr, the gradient of the routed queries
and keys, (2B, H, N, K)) is written in full and read back within the call, and nothing
it returns refers to it. Allocated afresh on every call, its pages come back from the
C allocator as page faults: glibc gives the top of its heap back to the system when a
free leaves more than its trim threshold there, and grows it again at the next call
(docs/performance.md, section 1, "The allocator"). Kept instead, the heap keeps its
size, and the op's other arrays reuse freed blocks: causal fwd+bwd at B=1 H=4 N=8192
d=K=e=64 float32, 2 threads, glibc's defaults, ~1,000 minor page faults in the forward
and ~1,550 in the backward per call with dr allocated, none with dr kept.

The arrays are per thread (threading.local): the trainer's shards call the op on two
threads at once, each with its own. A name holds one array; a call with another shape
or dtype replaces it, and an array above WORKSPACE_MAX_BYTES is never kept, so what
stays allocated between calls is bounded (per name and thread). release() drops the
calling thread's arrays.

The op's large arrays that outlive the call (the routed r in the cache, the output, the
gradients) cannot be kept that way: the caller holds them. They come from pooled()
instead: an array of at least POOL_MIN_BYTES is a view of a buffer that goes back to a
pool of free buffers when the last array or view of it is gone, and the next request for
the same number of bytes takes it from there, its pages already mapped. Allocated
afresh, such arrays come back as page faults even where dr's kept array has steadied the
heap: in float64 at N = 8192 (r and dx are 32 MiB and a little more, above the largest
mmap threshold glibc accepts, so always mapped afresh), and at every size once the
caller keeps the previous call's results while it makes the next call, as a training
loop does (docs/performance.md, section 1, "The allocator"). The pool holds at most
POOL_MAX_BYTES of free buffers (a buffer that would exceed it goes back to the C
allocator); release() empties it too.
"""

import math
import threading

import numpy as np

# The largest array kept, in bytes: dr at B=1 H=4 d=K=64 is 2 MiB at N = 1024 and 16 MiB
# at N = 8192 in float32, 32 MiB in float64; from N = 16384 in float64 it is allocated per call.
WORKSPACE_MAX_BYTES = 2 ** 25

_LOCAL = threading.local()


def scratch(name, shape, dtype):
    """An uninitialised array of `shape` and `dtype`: the one this thread's last
    scratch(name, ...) returned when shape and dtype are the same, else a new one (kept
    for the next call if it is at most WORKSPACE_MAX_BYTES). The caller writes every
    entry it reads and returns nothing that refers to it."""
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    shape, dtype = tuple(shape), np.dtype(dtype)
    a = buffers.get(name)
    if a is not None and a.shape == shape and a.dtype == dtype:
        return a
    buffers.pop(name, None)                 # free the old one before allocating the new
    a = np.empty(shape, dtype=dtype)
    if a.nbytes <= WORKSPACE_MAX_BYTES:
        buffers[name] = a
    return a


# Arrays below this many bytes come from np.empty: the C allocator's heap serves them
# without page faults once it has grown, and a pool would only hold their memory.
POOL_MIN_BYTES = 2 ** 20
# Free buffers the pool holds at most, in bytes: the op's pooled arrays at B=1 H=4
# d=K=e=64 and N = 8192 are ~96 MiB a call in float64 (r and dx 32 MiB each, o and dv 16),
# twice that while a caller keeps one call's results during the next.
POOL_MAX_BYTES = 2 ** 28

_POOL = {}                  # bytes -> the free buffers of that size (1-D uint8 arrays)
_POOL_BYTES = [0]           # the bytes of all free buffers
_POOL_LOCK = threading.RLock()   # reentrant: a buffer can come back (_Owner.__del__) while
                                 # its thread holds the lock in pooled()


class _Owner:
    """The owner of one pooled buffer, seen by NumPy through __array_interface__: the array
    pooled() returns has it as its base, and every view of that array reaches it through
    its bases, so it lives as long as any of them and no longer; then its buffer goes
    back to the pool."""

    def __init__(self, buffer, shape, dtype):
        self.buffer = buffer
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str,
                                    "data": (buffer.ctypes.data, False), "version": 3}

    def __del__(self):
        try:
            _give_back(self.buffer)
        except Exception:           # at interpreter exit the module may be gone already
            pass


def _give_back(buffer):
    with _POOL_LOCK:
        if _POOL_BYTES[0] + buffer.nbytes <= POOL_MAX_BYTES:
            _POOL.setdefault(buffer.nbytes, []).append(buffer)
            _POOL_BYTES[0] += buffer.nbytes


def pooled(shape, dtype):
    """An uninitialised C-contiguous array of `shape` and `dtype` (float32, float64 or
    another simple dtype). From POOL_MIN_BYTES on, its memory is a free buffer of the
    pool of the same size when there is one, else a new one, and goes back to the pool
    once the array and every view of it are gone (the module docstring)."""
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < POOL_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    with _POOL_LOCK:
        free = _POOL.get(nbytes)
        buffer = free.pop() if free else None
        if buffer is not None:
            _POOL_BYTES[0] -= nbytes
    if buffer is None:
        buffer = np.empty(nbytes, dtype=np.uint8)
    return np.asarray(_Owner(buffer, shape, dtype))


def pool_bytes():
    """The bytes of the free buffers the pool holds."""
    return _POOL_BYTES[0]


def release():
    """Drop the arrays the calling thread keeps and the pool's free buffers (their memory
    goes back to the C allocator; pooled arrays still in use go back to the pool later)."""
    _LOCAL.__dict__.pop("buffers", None)
    with _POOL_LOCK:
        _POOL.clear()
        _POOL_BYTES[0] = 0
