"""The two causal forms of GMA mixing against each other: the Numba token scan and the chunked BLAS form.

Dimension legend: P = B*H sequences, N tokens, K components, e value size, C tokens per chunk.

For P = 4, N in (1024, 8192), K = e in (16, 32, 64, 128), float32 and float64, this
times the forward and the forward + backward of

    scan      gma_np.memory.scan._causal_forward / _causal_backward
    chunk C   gma_np.memory.chunked.causal_chunked_forward / _backward, C in (16, 32, 64, 128)

on random rq, rk that are softmax rows (as the routing makes them) and random v, do.
Each figure is the median of --repeats runs, the forms interleaved within each repeat
(scan, chunk 16, chunk 32, ..., then again), so that load from other processes hits
all of them alike. The table prints milliseconds and, per chunked column, the ratio
chunked / scan (below 1: the chunked form is faster). Threads: the defaults; both
forms take Numba's thread count (the scan for its prange over P, the chunked form
for its streams of sequences, each on one-thread BLAS).

    python benchmarks/causal_forms.py            # the full grid, a few minutes
    python benchmarks/causal_forms.py --quick    # about a minute

Measured on a 2-core machine shared with another benchmarking process (default threads:
2 Numba threads for the scan, 2 streams of one-thread BLAS for the chunked form), the
scan being the transposed-state kernel of the same revision;
`python benchmarks/causal_forms.py`:

    norm=row  P=4  ms (median of 5), ratio chunked/scan
    dtype       N  K=e pass      scan  chunk 16  chunk 32  chunk 64 chunk 128      /16    /32    /64   /128
    float32  1024   16 fwd       0.37      5.91      2.64      2.46      2.27    15.99   7.15   6.65   6.14
    float32  1024   16 f+b       1.04     13.49      9.25      9.57     10.87    12.94   8.88   9.17  10.43
    float32  1024   32 fwd       0.80      2.68      2.96      3.10      3.59     3.35   3.69   3.87   4.49
    float32  1024   32 f+b       2.78     14.37     12.45     12.12     15.19     5.16   4.47   4.36   5.46
    float32  1024   64 fwd       1.49      9.06      4.34      4.14      4.85     6.08   2.91   2.78   3.26
    float32  1024   64 f+b       5.86     16.53     15.05     15.64     18.84     2.82   2.57   2.67   3.22
    float32  1024  128 fwd       7.67     18.51      9.29     10.07     10.58     2.41   1.21   1.31   1.38
    float32  1024  128 f+b      29.12     45.53     37.09     36.58     38.60     1.56   1.27   1.26   1.33
    float32  8192   16 fwd       1.33     16.07     13.02     12.35     12.86    12.11   9.80   9.30   9.69
    float32  8192   16 f+b       4.78     58.37     53.69     51.09     57.93    12.21  11.23  10.69  12.12
    float32  8192   32 fwd       3.43     19.70     13.72     16.09     16.53     5.74   4.00   4.68   4.81
    float32  8192   32 f+b      13.39     60.48     55.43     62.83     70.23     4.52   4.14   4.69   5.24
    float32  8192   64 fwd      23.18     44.12     36.51     47.83     51.77     1.90   1.58   2.06   2.23
    float32  8192   64 f+b      79.78    151.72    146.47    138.34    179.06     1.90   1.84   1.73   2.24
    float32  8192  128 fwd      47.33     80.60     75.14     60.66     66.35     1.70   1.59   1.28   1.40
    float32  8192  128 f+b     192.76    290.81    249.28    240.02    273.07     1.51   1.29   1.25   1.42
    float64  1024   16 fwd       0.26      1.58      1.83      1.63      1.82     6.11   7.05   6.29   7.00
    float64  1024   16 f+b       0.69      7.17      7.00      6.72      7.14    10.39  10.14   9.74  10.35
    float64  1024   32 fwd       0.55      4.99      2.30      2.57      2.74     9.15   4.21   4.71   5.02
    float64  1024   32 f+b       2.04     10.81      9.12      9.58     10.05     5.29   4.46   4.68   4.91
    float64  1024   64 fwd       1.56      7.14      3.41      3.31      4.17     4.58   2.19   2.13   2.68
    float64  1024   64 f+b       6.74     15.27     12.39     12.58     15.37     2.27   1.84   1.87   2.28
    float64  1024  128 fwd       6.15     16.13      7.99      8.02      9.03     2.62   1.30   1.30   1.47
    float64  1024  128 f+b      25.47     32.64     28.16     28.63     32.00     1.28   1.11   1.12   1.26
    float64  8192   16 fwd       1.25     14.42     10.27     10.44     10.85    11.53   8.21   8.35   8.68
    float64  8192   16 f+b       4.81     48.08     43.77     42.21     46.94     9.99   9.09   8.77   9.75
    float64  8192   32 fwd       3.20     19.45     12.61     16.04     16.61     6.07   3.93   5.00   5.18
    float64  8192   32 f+b      14.78     56.47     52.39     60.27     66.88     3.82   3.55   4.08   4.53
    float64  8192   64 fwd      11.77     30.88     22.35     24.21     29.76     2.62   1.90   2.06   2.53
    float64  8192   64 f+b      55.64     90.42     84.87     91.01    114.03     1.63   1.53   1.64   2.05
    float64  8192  128 fwd      73.70     82.51     63.20     65.18     73.77     1.12   0.86   0.88   1.00
    float64  8192  128 f+b     296.45    305.99    245.86    265.16    428.01     1.03   0.83   0.89   1.44

`python benchmarks/causal_forms.py --norm slot --quick`:

    norm=slot  P=4  ms (median of 3), ratio chunked/scan
    dtype       N  K=e pass      scan  chunk 16  chunk 32  chunk 64 chunk 128      /16    /32    /64   /128
    float32  1024   32 fwd       0.48      4.37      2.93      2.59      2.95     9.03   6.04   5.35   6.09
    float32  1024   32 f+b       1.59     11.22      9.12      9.17     11.14     7.04   5.72   5.75   6.99
    float32  1024  128 fwd       6.12     17.30      8.77      8.98     12.00     2.83   1.43   1.47   1.96
    float32  1024  128 f+b      25.16     41.97     34.61     38.54     43.71     1.67   1.38   1.53   1.74
    float32  8192   32 fwd       3.14     25.80     19.62     20.55     26.91     8.22   6.25   6.54   8.57
    float32  8192   32 f+b      15.77     78.94     64.99     74.89     76.63     5.01   4.12   4.75   4.86
    float32  8192  128 fwd      51.29     89.95     66.22     82.45     83.92     1.75   1.29   1.61   1.64
    float32  8192  128 f+b     213.18    323.27    238.81    256.39    317.09     1.52   1.12   1.20   1.49

Spot checks, same machine, 7 interleaved repeats (row, then slot float64), and K = e = 256
(row float32, 5 repeats), outside the grid:

    dtype       N  K=e pass      scan  chunk 32  chunk 64      /32    /64
    float32  8192  128 f+b     192.50    213.70    213.17     1.11   1.11
    float64  8192  128 f+b     211.81    226.53    231.07     1.07   1.09
    float64  8192  128 f+b     259.42    255.92    245.90     0.99   0.95   (slot)
    float32  4096  256 fwd      99.89    104.60     89.01     1.05   0.89
    float32  4096  256 f+b     353.29    353.69    318.20     1.00   0.90

What the figures say: the token scan is faster at every shape of the grid except
N = 8192, K = e = 128 with forward + backward, where the two are level: 0.83 - 0.89 in
the float64 rows of the full table (a run in which the scan's repeats were slow), 0.95 -
1.11 in the 7-repeat spot checks. The chunked form pulls ahead only from K = e = 256
(0.9 with C = 64); its forward alone is slower at every K = e <= 128. Its work
per token is the scan's 7 K e multiply-adds (forward + backward) plus C (4 K + 3 e) for
the chunks, at the speed of float64 GEMMs of a few dozen rows (6-17 G multiply-adds/s
per core measured on the single products, not much faster per multiply-add than the
fused scan loop), plus O(N (K + e)) elementwise passes and Python overhead per group:
it can only win where K e is large against C (K + e). At
small K, e (16, 32) it is 4-12x slower. Chunk 32 or 64 is the best chunk length
everywhere (16 pays the per-product overhead, 128 the C^2 terms).
"""

import argparse
import statistics
import time

import numpy as np

from gma_np.memory.chunked import causal_chunked_backward, causal_chunked_forward
from gma_np.memory.scan import _causal_backward, _causal_forward, scan_checkpoints


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
    def scan_fb(rq, rk, v, do):                  # as gma_forward and gma_backward run it
        checkpoints = scan_checkpoints(*rq.shape, v.shape[2])
        _causal_forward(rq, rk, v, slot, eps, None, checkpoints)
        drq, drk = np.empty_like(rq), np.empty_like(rk)
        return _causal_backward(rq, rk, v, do, slot, eps, drq, drk, None, checkpoints)

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
