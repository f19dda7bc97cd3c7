"""The two causal forms of GMA mixing against each other: the Numba token scan and the chunked BLAS form.

Dimension legend: P = B*H sequences, N tokens, K components, e value size, C tokens per chunk.

For P = 4, N in (1024, 8192), K = e in (16, 32, 64, 128), float32 and float64, this
times the forward and the forward + backward of

    scan      gma_np.ops.mixing._causal_forward / _causal_backward
    chunk C   gma_np.ops.chunked.causal_chunked_forward / _backward, C in (16, 32, 64, 128)

on random rq, rk that are softmax rows (as the routing makes them) and random v, do.
Each figure is the median of --repeats runs, the forms interleaved within each repeat
(scan, chunk 16, chunk 32, ..., then again), so that load from other processes hits
all of them alike. The table prints milliseconds and, per chunked column, the ratio
chunked / scan (below 1: the chunked form is faster). Threads: the defaults (the scan
runs on Numba's threads, the chunked form on BLAS's).

    python benchmarks/causal_forms.py            # the full grid, a few minutes
    python benchmarks/causal_forms.py --quick    # about a minute

Measured (2-core machine shared with another benchmarking process, default threads,
medians of 5 interleaved repeats; `python benchmarks/causal_forms.py`):

    (table filled in below)
"""

import argparse
import statistics
import time

import numpy as np

from gma_np.ops.chunked import causal_chunked_backward, causal_chunked_forward
from gma_np.ops.mixing import _causal_backward, _causal_forward


def softmax_rows(x):
    """Rows of exp(x) / sum exp(x): what the routing hands to the mixing."""
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def make_inputs(P, N, K, e, dtype, seed=0):
    rng = np.random.default_rng(seed)
    rq = softmax_rows(2.0 * rng.standard_normal((P, N, K))).astype(dtype)   # (P, N, K)
    rk = softmax_rows(2.0 * rng.standard_normal((P, N, K))).astype(dtype)   # (P, N, K)
    v = rng.standard_normal((P, N, e)).astype(dtype)                         # (P, N, e)
    do = rng.standard_normal((P, N, e)).astype(dtype)                        # (P, N, e)
    return rq, rk, v, do


def forms(chunks, slot, eps):
    """name -> (forward(rq, rk, v), forward_backward(rq, rk, v, do))."""
    def scan_fb(rq, rk, v, do):
        _causal_forward(rq, rk, v, slot, eps)
        drq, drk = np.empty_like(rq), np.empty_like(rk)
        return _causal_backward(rq, rk, v, do, slot, eps, drq, drk)

    out = {"scan": (lambda rq, rk, v: _causal_forward(rq, rk, v, slot, eps), scan_fb)}
    for C in chunks:
        def fb(rq, rk, v, do, C=C):
            causal_chunked_forward(rq, rk, v, slot, eps, C)
            drq, drk = np.empty_like(rq), np.empty_like(rk)
            return causal_chunked_backward(rq, rk, v, do, slot, eps, C, drq, drk)
        out[f"chunk {C}"] = (lambda rq, rk, v, C=C: causal_chunked_forward(rq, rk, v, slot, eps, C), fb)
    return out


def time_once(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run(P, Ns, Ks, dtypes, chunks, repeats, slot, eps=1e-6):
    named = forms(chunks, slot, eps)
    names = list(named)
    header = (f"{'dtype':7} {'N':>5} {'K=e':>4} {'pass':4} " + " ".join(f"{n:>9}" for n in names)
              + "   " + " ".join(f"{'/' + n.split()[-1]:>6}" for n in names[1:]))
    print(f"norm={'slot' if slot else 'row'}  P={P}  ms (median of {repeats}), ratio chunked/scan")
    print(header)
    for dtype in dtypes:
        for N in Ns:
            for K in Ks:
                rq, rk, v, do = make_inputs(P, N, K, K, dtype)
                for name in names:                              # warm-up: compile, page in buffers
                    named[name][1](rq, rk, v, do)
                times = {(n, w): [] for n in names for w in ("fwd", "f+b")}
                for _ in range(repeats):
                    for n in names:
                        times[n, "fwd"].append(time_once(named[n][0], rq, rk, v))
                        times[n, "f+b"].append(time_once(named[n][1], rq, rk, v, do))
                for w in ("fwd", "f+b"):
                    med = {n: 1e3 * statistics.median(times[n, w]) for n in names}
                    print(f"{np.dtype(dtype).name:7} {N:5d} {K:4d} {w:4} "
                          + " ".join(f"{med[n]:9.2f}" for n in names) + "   "
                          + " ".join(f"{med[n] / med['scan']:6.2f}" for n in names[1:]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N 1024 and 8192 at K=e 32, 128; float32; 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--norm", choices=("row", "slot"), default="row")
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128])
    args = ap.parse_args()
    if args.quick:
        Ns, Ks, dtypes, repeats = (1024, 8192), (32, 128), (np.float32,), 3
    else:
        Ns, Ks, dtypes, repeats = (1024, 8192), (16, 32, 64, 128), (np.float32, np.float64), 5
    run(4, Ns, Ks, dtypes, args.chunks, args.repeats or repeats, args.norm == "slot")


if __name__ == "__main__":
    main()
