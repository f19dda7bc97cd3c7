"""Peak memory of causal GMA (forward + backward) against N: is it linear in N?

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K components.

For each N (doubling from --min-n to --max-n) at B=1, H=1, K=32, d=e=64,
float32, this runs gma_forward(..., causal=True) followed by gma_backward and
prints:

    N, peak traced bytes, bytes per token, peak(N) / peak(N/2), median wall time

What is counted: Python's tracemalloc, started after the inputs (q, k, v, the
mixture and the cotangent do) are allocated, so the peak is what the engine
itself allocates: the cache, the scan buffers, the outputs and gradients and
every NumPy temporary (NumPy reports its array buffers to tracemalloc). Not
counted: the inputs; the O(e) scratch that the Numba kernels allocate
internally (Numba's own allocator, invisible to tracemalloc); the compiled
code. The causal scan never allocates N x N nor N x K x e, so the peak should
be a constant number of bytes per token: the ratio of consecutive rows tends
to 2 (linear memory: <= 2.2 from N = 32768 on).

Wall times are medians of --repeats untraced runs (tracemalloc slows NumPy
allocation down); the traced run is separate. Numba compilation happens in a
warm-up call before anything is measured.

    python benchmarks/causal_memory.py                 # N = 4096 .. 65536
    python benchmarks/causal_memory.py --max-n 131072 --repeats 5

--speed: the time of the causal memory op itself at the trainer's shapes, not its
memory. The functions timed are the ones the trainer's profile row "memory (causal)"
wraps (benchmarks/train_speed.py): gma_np.memory.scan._causal_forward and
_causal_backward, on float32 routed features (softmax rows), row norm, as
gma_forward / gma_backward call them (the backward from the forward's states every
SCAN_CHECKPOINT_TOKENS tokens), plus the two blocked forward kernels called
directly (rows of S, columns of S^T; the wrapper runs one of them by K). Shapes
(P = B x H sequences): tiny P=128 N=128 K=16 e=32 (B=32 H=4), small P=192 N=256
K=32 e=32 (B=32 H=6), and the op's B=1 H=4 K=e=64 at N=1024 and 8192. Medians of
--repeats rounds of 5 calls each, the candidates interleaved within each round;
wall time and process CPU time (on a loaded machine CPU time is the steadier of the
two); for each Numba thread count in --threads; the load average before and after.

    python benchmarks/causal_memory.py --speed
    python benchmarks/causal_memory.py --speed --shapes tiny small --threads 1 2 --repeats 9
"""

import argparse
import os
import statistics
import time
import tracemalloc

import numba
import numpy as np

import gma_np
from gma_np._numerics import DEFAULT_EPS
from gma_np.memory.scan import (
    _causal_backward,
    _causal_forward,
    _causal_scan_forward_blocked,
    _causal_scan_forward_blocked_rows,
    _no_checkpoints,
    scan_checkpoints,
)

# name: (P, N, K, e), P = batch x heads
SPEED_SHAPES = {
    "tiny": (128, 128, 16, 32),      # the trainer's tiny preset: B=32 H=4
    "small": (192, 256, 32, 32),     # the trainer's small preset: B=32 H=6
    "op1024": (4, 1024, 64, 64),     # the op's benchmark shape, B=1 H=4
    "op8192": (4, 8192, 64, 64),
}


def make_inputs(N, B=1, H=1, d=64, e=64, K=32, seed=0, dtype=np.float32):
    """Random causal-GMA inputs and a cotangent for o, all allocated by the caller."""
    rng = np.random.default_rng(seed)
    args = dict(
        q=rng.standard_normal((B, H, N, d)).astype(dtype),         # (B, H, N, d)
        k=rng.standard_normal((B, H, N, d)).astype(dtype),         # (B, H, N, d)
        v=rng.standard_normal((B, H, N, e)).astype(dtype),         # (B, H, N, e)
        means=rng.standard_normal((H, K, d)).astype(dtype),        # (H, K, d)
        log_var=np.zeros((H, K, d), dtype=dtype),                  # (H, K, d)
        logits=np.zeros((H, K), dtype=dtype),                      # (H, K)
    )
    do = rng.standard_normal((B, H, N, e)).astype(dtype)           # (B, H, N, e)
    return args, do


def forward_backward(args, do):
    o, cache = gma_np.gma_forward(**args, causal=True)
    grads = gma_np.gma_backward(do, cache)
    return o, grads


def traced_peak(args, do):
    """Peak bytes traced by tracemalloc during one forward + backward."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    o, grads = forward_backward(args, do)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del o, grads
    return peak


def wall_time(args, do, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward_backward(args, do)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_inputs(P, N, K, e, seed=0):
    """Routed features as gma_forward passes them: rq, rk (P, N, K) softmax rows, v and
    the cotangent do (P, N, e), all float32."""
    rng = np.random.default_rng(seed)

    def rows(x):
        x = np.exp(x - x.max(axis=-1, keepdims=True))
        return x / x.sum(axis=-1, keepdims=True)

    rq = rows(2.0 * rng.standard_normal((P, N, K))).astype(np.float32)   # (P, N, K)
    rk = rows(2.0 * rng.standard_normal((P, N, K))).astype(np.float32)   # (P, N, K)
    v = rng.standard_normal((P, N, e)).astype(np.float32)                # (P, N, e)
    do = rng.standard_normal((P, N, e)).astype(np.float32)               # (P, N, e)
    return rq, rk, v, do


def speed_candidates(rq, rk, v, do):
    """name -> a call with no arguments, for the shape of the given inputs."""
    P, N, K = rq.shape
    e = v.shape[2]
    drq, drk = np.empty_like(rq), np.empty_like(rk)
    checkpoints = scan_checkpoints(P, N, K, e)          # as gma_forward keeps them
    _causal_forward(rq, rk, v, False, DEFAULT_EPS, None, checkpoints)

    def kernel(fn):
        def run():
            S, z, out = np.zeros((P, K, e)), np.zeros((P, K)), np.empty_like(v)
            fn(rq, rk, v, False, DEFAULT_EPS, S, z, out, np.empty(P), *_no_checkpoints(P, K, e))
        return run

    return {
        "forward": lambda: _causal_forward(rq, rk, v, False, DEFAULT_EPS, None, checkpoints),
        "backward": lambda: _causal_backward(rq, rk, v, do, False, DEFAULT_EPS, drq, drk, None,
                                             checkpoints),
        "fwd kernel rows": kernel(_causal_scan_forward_blocked_rows),
        "fwd kernel columns": kernel(_causal_scan_forward_blocked),
    }


def speed(a):
    """The --speed mode (module docstring)."""
    load0 = os.getloadavg()
    threads0 = numba.get_num_threads()
    print(f"causal memory op, float32, row norm; medians of {a.repeats} rounds x 5 calls, "
          f"interleaved; wall / process CPU in ms; load average {load0[0]:.2f} {load0[1]:.2f}")
    print(f"{'shape':>8} {'P':>4} {'N':>5} {'K':>3} {'e':>3} {'thr':>3} {'call':>20} "
          f"{'wall':>9} {'cpu':>9}")
    try:
        for name in a.shapes:
            P, N, K, e = SPEED_SHAPES[name]
            calls = speed_candidates(*speed_inputs(P, N, K, e))
            for fn in calls.values():
                fn()                                                   # compile, warm up
            for threads in a.threads:
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                wall = {c: [] for c in calls}
                cpu = {c: [] for c in calls}
                for _ in range(a.repeats):
                    for c, fn in calls.items():
                        t0, c0 = time.perf_counter(), time.process_time()
                        for _ in range(5):
                            fn()
                        wall[c].append((time.perf_counter() - t0) / 5)
                        cpu[c].append((time.process_time() - c0) / 5)
                for c in calls:
                    print(f"{name:>8} {P:>4} {N:>5} {K:>3} {e:>3} {numba.get_num_threads():>3} "
                          f"{c:>20} {1e3 * statistics.median(wall[c]):>9.3f} "
                          f"{1e3 * statistics.median(cpu[c]):>9.3f}", flush=True)
    finally:
        numba.set_num_threads(threads0)
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-n", type=int, default=4096, help="first N (default 4096)")
    parser.add_argument("--max-n", type=int, default=65536, help="last N (default 65536)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="untraced runs per N for the median wall time (default 3)")
    parser.add_argument("--K", type=int, default=32, help="components (default 32)")
    parser.add_argument("--d", type=int, default=64, help="query/key size (default 64)")
    parser.add_argument("--e", type=int, default=64, help="value size (default 64)")
    parser.add_argument("--speed", action="store_true",
                        help="time the causal memory op at the trainer's shapes instead")
    parser.add_argument("--shapes", nargs="+", choices=list(SPEED_SHAPES),
                        default=["tiny", "small", "op1024", "op8192"], help="--speed: shapes")
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="--speed: Numba thread counts (default: all, then 1)")
    a = parser.parse_args(argv)
    if a.speed:
        if a.threads is None:
            a.threads = [numba.get_num_threads(), 1]
        if a.repeats < 1 or min(a.threads) < 1:
            parser.error("--repeats and --threads: expected integers >= 1")
        speed(a)
        return
    if a.min_n < 1 or a.max_n < a.min_n:
        parser.error(f"--min-n/--max-n: expected 1 <= min-n <= max-n, got {a.min_n}, {a.max_n}")

    warm, warm_do = make_inputs(64, d=a.d, e=a.e, K=a.K)
    forward_backward(warm, warm_do)                                # compile the kernels

    print(f"causal GMA forward + backward, B=1 H=1 K={a.K} d={a.d} e={a.e} float32; "
          f"tracemalloc peak (inputs excluded), wall time median of {a.repeats}")
    print(f"{'N':>8} {'peak bytes':>14} {'bytes/token':>12} {'peak/prev':>10} {'time (s)':>9}")
    prev = None
    N = a.min_n
    while N <= a.max_n:
        args, do = make_inputs(N, d=a.d, e=a.e, K=a.K)
        peak = traced_peak(args, do)
        t = wall_time(args, do, a.repeats)
        ratio = f"{peak / prev:10.3f}" if prev else f"{'-':>10}"
        print(f"{N:>8} {peak:>14,} {peak / N:>12.1f} {ratio} {t:>9.3f}", flush=True)
        prev = peak
        N *= 2


if __name__ == "__main__":
    main()
