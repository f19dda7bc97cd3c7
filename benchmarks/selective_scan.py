"""The selective scan's forward + backward: gma_np against a straightforward PyTorch loop.

    python benchmarks/selective_scan.py [--lengths 1024 4096] [--repeats 5]

The PyTorch twin is the recurrence written as a loop over t with autograd (what a
reader would write first, as the reference CPU implementations do):
h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, y_t = C_t . h_t + D x_t. Both run on
the same float32 inputs (B = 1, M = 256 channels, S = 16 state), interleaved, one
thread each (Numba and BLAS for gma_np, torch.set_num_threads(1)), medians of the
repeats. The outputs and every gradient are compared once per length. PyTorch is
optional: without it the script times gma_np alone.
"""

import argparse
import time

import numpy as np

from gma_np._threads import blas_threads
from gma_np.mixers.mamba import selective_scan_backward, selective_scan_forward

try:
    import torch
except ImportError:                      # optional: time gma_np alone
    torch = None


def inputs(N, M=256, S=16, seed=0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return dict(x=rng.standard_normal((1, N, M)).astype(f32),
                delta=(0.01 + 0.1 * rng.random((1, N, M))).astype(f32),
                A=(-np.tile(np.arange(1, S + 1), (M, 1))).astype(f32),
                B=rng.standard_normal((1, N, S)).astype(f32),
                C=rng.standard_normal((1, N, S)).astype(f32),
                D=np.ones(M, dtype=f32))


def gma_np_step(a, dy):
    y, cache = selective_scan_forward(**a)
    return y, selective_scan_backward(dy, cache)


def torch_step(a, dy):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in a.items()}
    x, delta, A, B, C, D = (t[k] for k in ("x", "delta", "A", "B", "C", "D"))
    h = torch.zeros(x.shape[0], x.shape[2], A.shape[1])             # (B, M, S)
    ys = []
    for i in range(x.shape[1]):
        dA = torch.exp(delta[:, i, :, None] * A)                    # (B, M, S)
        h = dA * h + (delta[:, i] * x[:, i])[:, :, None] * B[:, i, None, :]
        ys.append((h * C[:, i, None, :]).sum(-1) + D * x[:, i])
    y = torch.stack(ys, dim=1)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


def median_time(fn, *args, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import numba
    numba.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    print(f"{'N':>6} {'gma_np ms':>10} {'torch ms':>10} {'ratio':>7} {'max rel diff':>13}")
    with blas_threads(1):
        for N in args.lengths:
            a = inputs(N)
            dy = np.random.default_rng(1).standard_normal(a["x"].shape).astype(np.float32)
            gma_np_step(a, dy)                                      # compile, warm
            if torch is None:
                t = median_time(gma_np_step, a, dy, repeats=args.repeats)
                print(f"{N:>6} {1e3 * t:>10.1f} {'-':>10} {'-':>7} {'-':>13}")
                continue
            y, g = gma_np_step(a, dy)
            ty, tg = torch_step(a, dy)
            diff = max(np.abs(u - v).max() / np.abs(v).max()
                       for u, v in [(y, ty)] + [(g[k], tg[k]) for k in tg])
            ours, theirs = [], []
            for _ in range(args.repeats):                           # interleaved
                ours.append(median_time(gma_np_step, a, dy, repeats=1))
                theirs.append(median_time(torch_step, a, dy, repeats=1))
            t_ours, t_theirs = float(np.median(ours)), float(np.median(theirs))
            print(f"{N:>6} {1e3 * t_ours:>10.1f} {1e3 * t_theirs:>10.1f} "
                  f"{t_ours / t_theirs:>7.3f} {diff:>13.2e}")


if __name__ == "__main__":
    main()
