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
"""

import argparse
import statistics
import time
import tracemalloc

import numpy as np

import gma_np


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-n", type=int, default=4096, help="first N (default 4096)")
    parser.add_argument("--max-n", type=int, default=65536, help="last N (default 65536)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="untraced runs per N for the median wall time (default 3)")
    parser.add_argument("--K", type=int, default=32, help="components (default 32)")
    parser.add_argument("--d", type=int, default=64, help="query/key size (default 64)")
    parser.add_argument("--e", type=int, default=64, help="value size (default 64)")
    a = parser.parse_args(argv)
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
