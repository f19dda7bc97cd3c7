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
"""

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


def release():
    """Drop the arrays the calling thread keeps (their memory goes back to the allocator)."""
    _LOCAL.__dict__.pop("buffers", None)
