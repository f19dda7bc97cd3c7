"""How large must a single wrong gradient element be for gradcheck's random mode to see it?

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K components.

Causal GMA (row norm) at B=1, H=2, N=64, d=4, e=8, K=4 in float64: the
gradient dv has 1024 elements. One element of dv (the largest, then the
median one by magnitude) is multiplied by (1 + delta), and
gma_np.gradcheck(mode="random", 3 directions) is run with 10 seeds. Printed:
in how many of the 10 runs the corrupted dv was flagged. Theory
(docs/gradcheck.md): a single element i is seen only when, roughly,
delta > rtol * sum_j |g_j| / |g_i|.

    python benchmarks/gradcheck_sensitivity.py
"""

import numpy as np

import gma_np
from gma_np.selfcheck import make_problem

OPTS = dict(causal=True, norm="row")
SEEDS = 10


def fun(**a):
    return gma_np.gma(**a, **OPTS)


def grad(dout, **a):
    return gma_np.gma_backward(dout, gma_np.gma_forward(**a, **OPTS)[1])


def main():
    inputs, _ = make_problem(np.random.default_rng(0), B=1, H=2, N=64, d=4, e=8, K=4)
    do = np.random.default_rng(1).standard_normal(fun(**inputs).shape)   # (B, H, N, e)
    g = grad(do, **inputs)["v"]                                          # (B, H, N, e)
    mags = np.abs(g).ravel()
    picks = {"largest": int(np.argmax(mags)), "median": int(np.argsort(mags)[mags.size // 2])}
    print(f"dv: {g.size} elements, largest |g| / mean |g| = {mags.max() / mags.mean():.1f}; "
          f"random mode, 3 directions, flagged in how many of {SEEDS} seeds")
    deltas = (1e-4, 1e-3, 1e-2, 1e-1)
    print(f"{'element':<8} {'rtol*sum|g|/|g_i|':>18} " + " ".join(f"{d:>8g}" for d in deltas))
    for label, flat in picks.items():
        index = np.unravel_index(flat, g.shape)
        row = []
        for delta in deltas:
            def wrong(dout, **a):
                gg = grad(dout, **a)
                gg["v"] = gg["v"].copy()
                gg["v"][index] *= 1 + delta
                return gg
            flagged = sum(not gma_np.gradcheck(fun, wrong, inputs, dout=do, wrt=["v"],
                                               mode="random", seed=s)["v"].ok
                          for s in range(SEEDS))
            row.append(f"{flagged:>5}/{SEEDS}")
        print(f"{label:<8} {1e-6 * mags.sum() / mags[flat]:>18.1e} " + " ".join(row))


if __name__ == "__main__":
    main()
