"""Time and peak memory of GMA against N, K and d, with the PyTorch baseline beside it.

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K components.

For every configuration (bidirectional / causal, norm row / slot, float32 /
float64) and every N it measures, with `--repeats` repeats and medians:

- fwd       the forward, gma_np.gma_forward
- fwd+bwd   forward and backward, gma_np.gma_forward + gma_np.gma_backward
- GF/s      the achieved rate of fwd+bwd by the model count 24NdK + 12NKe flops
            per head (routing: one forward and two backward GEMM-equivalents
            of 2NdK each for q and k; memory: write, read and their backward)
- peak MB   the peak resident memory the fwd+bwd call adds (VmHWM - VmRSS, the
            high-water mark reset before the call through /proc/self/clear_refs;
            falls back to tracemalloc where /proc does not allow it)

With PyTorch installed (optional, never a dependency of gma_np), the same math
written the straightforward PyTorch way (benchmarks/torch_gma.py: matmul-
expanded responsibilities, chunked causal read-out, autograd backward) is
timed in the same run, interleaved repeat by repeat with gma_np so that both
see the same machine load, and the table shows the ratio gma_np / torch
(below 1 means gma_np is faster). Softmax attention (torch SDPA, quadratic)
is timed too, up to --sdpa-max-n. PyTorch runs in a subprocess of its own
(TorchWorker), handed each point and asked for each timed call in turn, and
this process never imports it: torch bundles a libgomp with the soname of
Numba's, and in one process Numba's OpenMP pool would be torch's, spinning after
every parallel region instead of sleeping (docs/performance.md, section 1).

--keep-freed-memory gives both processes the C allocator setting that train() uses
(gma_np._allocator): under glibc's defaults the op's large arrays come back as fresh pages
on every call, page faults that cost gma_np 15-40 ms of system time a call at N = 8192
(docs/performance.md, section 1, "The allocator"); by default both run under the defaults, what a user's
process has.

It then times recurrent decoding: gma_step at positions 100 and 4000
(tokens/s for the whole (B, H) batch), and writes a log-log PNG of time and
memory against N with the slopes fitted from N >= 4096 (matplotlib optional).

Threads: --threads T sets Numba's threads (gma_np._threads.set_numba_threads), the
BLAS threads (through the OPENBLAS/OMP/MKL_NUM_THREADS environment variables, set
before NumPy is imported) and torch.set_num_threads(T). Without it every library uses
its default (all cores).

    python benchmarks/bench_gma.py --quick
    python benchmarks/bench_gma.py                      # N = 1k .. 64k, the full matrix
    python benchmarks/bench_gma.py --configs causal-row --dtypes float32 --n 1024 8192 --repeats 7
    python benchmarks/bench_gma.py --n 8192 --K 16 32 64 128 --configs causal-row
"""

import argparse
import json
import os
import pickle
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="N = 1024, 4096; causal-row and bidir-row; 3 repeats; gma_step at 100 only")
    p.add_argument("--n", type=int, nargs="+", default=None, help="sequence lengths (default 1k..64k)")
    p.add_argument("--K", type=int, nargs="+", default=[64], help="mixture components")
    p.add_argument("--d", type=int, nargs="+", default=[64], help="query/key head size (e = d)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--configs", nargs="+", default=None,
                   help="of causal-row causal-slot bidir-row bidir-slot (default: all)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per point (median)")
    p.add_argument("--threads", type=int, default=None, help="threads of Numba, BLAS and torch")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--sdpa-max-n", type=int, default=16384, help="largest N for softmax SDPA")
    p.add_argument("--torch-max-n", type=int, default=65536, help="largest N for the PyTorch GMA")
    p.add_argument("--no-decode", action="store_true", help="skip the gma_step timing")
    p.add_argument("--plot", default="bench_gma.png", help="PNG path ('' to skip)")
    p.add_argument("--json", default="", help="also write the rows as JSON to this path")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: child process
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="give this process and the torch worker's the C allocator setting "
                        "train() uses (gma_np._allocator.keep_freed_memory); by default both "
                        "run under glibc's defaults")
    p.add_argument("--serve-torch", action="store_true", help=argparse.SUPPRESS)  # internal: TorchWorker
    args = p.parse_args(argv)
    if args.quick:
        args.n = args.n or [1024, 4096]
        args.configs = args.configs or ["causal-row", "bidir-row"]
        args.repeats = min(args.repeats, 3)
        args.sdpa_max_n = min(args.sdpa_max_n, 4096)
    args.n = args.n or [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    args.configs = args.configs or ["causal-row", "causal-slot", "bidir-row", "bidir-slot"]
    return args


ARGS = parse_args()
if ARGS.threads is not None:
    # must happen before NumPy (and its BLAS) is imported
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

try:
    import gma_np  # noqa: E402
except ImportError:                                     # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gma_np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _import_torch():
    """(torch, torch_gma): imported only in the TorchWorker's process and a memory child."""
    import torch
    sys.path.insert(0, HERE)
    import torch_gma
    return torch, torch_gma


def torch_available():
    import importlib.util
    return importlib.util.find_spec("torch") is not None


# ----------------------------------------------------------------------------- measuring

def flops_model(N, d, K, e, H, B, backward=True):
    """Model flop count of GMA: per head 24NdK + 12NKe for fwd+bwd, a third of it for fwd."""
    per_head = 24 * N * d * K + 12 * N * K * e
    return B * H * (per_head if backward else per_head // 3)


def _fixed_mmap_threshold():
    """Make glibc return every block >= 64 KiB to the system when freed (Linux only).

    By default glibc raises its mmap threshold after the first large free, and
    later large arrays come from a heap that is never given back: the resident
    size then stops following what is allocated and the peak below reads 0.
    A fixed threshold (mallopt M_MMAP_THRESHOLD) keeps RSS honest, for NumPy
    and torch alike.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)                      # M_MMAP_THRESHOLD
        libc.malloc_trim(0)                              # give back what the timing left free
    except (OSError, AttributeError):
        pass


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def peak_memory_mb(fn):
    """Peak resident memory (MB) that fn() adds above what is resident before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                 # reset VmHWM to the current VmRSS
        before = _rss_kb("VmRSS")
        fn()
        return (_rss_kb("VmHWM") - before) / 1024.0
    except OSError:
        import tracemalloc
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak / 2**20


def make_problem(N, d, K, e, B, H, dtype, seed=0):
    """Random inputs at unit scale; variances d/4 so that responsibilities are not one-hot."""
    rng = np.random.default_rng(seed)
    return dict(
        q=rng.standard_normal((B, H, N, d)).astype(dtype),
        k=rng.standard_normal((B, H, N, d)).astype(dtype),
        v=rng.standard_normal((B, H, N, e)).astype(dtype),
        means=rng.standard_normal((H, K, d)).astype(dtype),
        log_var=(np.log(d / 4.0) + 0.3 * rng.standard_normal((H, K, d))).astype(dtype),
        logits=(0.5 * rng.standard_normal((H, K))).astype(dtype),
    )


def gma_np_runners(inputs, causal, norm):
    do = np.ones(inputs["v"].shape, inputs["v"].dtype)

    def fwd():
        return gma_np.gma(**inputs, causal=causal, norm=norm)

    def fwd_bwd():
        o, cache = gma_np.gma_forward(**inputs, causal=causal, norm=norm)
        return gma_np.gma_backward(do, cache)
    return fwd, fwd_bwd


def torch_runners(inputs, causal, norm):
    torch, torch_gma = _import_torch()
    t = {n: torch.tensor(a, requires_grad=True) for n, a in inputs.items()}

    def fwd():
        with torch.no_grad():
            return torch_gma.gma(**t, causal=causal, norm=norm)

    def fwd_bwd():
        for a in t.values():
            a.grad = None
        o = torch_gma.gma(**t, causal=causal, norm=norm)
        o.backward(torch.ones_like(o))
    return fwd, fwd_bwd


def sdpa_runner(inputs, causal):
    torch, torch_gma = _import_torch()
    q, k, v = (torch.tensor(inputs[n], requires_grad=True) for n in ("q", "k", "v"))

    def fwd_bwd():
        for a in (q, k, v):
            a.grad = None
        o = torch_gma.sdpa(q, k, v, causal)
        o.backward(torch.ones_like(o))
    return fwd_bwd


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def steady_timer(fn):
    """A timer: fn once untimed, then the seconds of one timed call. Each timed call comes
    right after an untimed call of the same fn, so it sees that implementation's steady
    state (its threads awake, its buffers paged in), as in a training loop, not the state
    the other implementation left; a pause before each timed call would time cold caches
    and sleeping threads instead (docs/performance.md, section 1)."""
    def timer():
        fn()
        return timed(fn)
    return timer


class TorchWorker:
    """The PyTorch baseline in a subprocess of its own (this script with --serve-torch):
    handed a point, it builds the same inputs (make_problem, same seed) and runs a timer
    (steady_timer) of one of its calls on request, returning the seconds it measured."""

    def __init__(self, args):
        import subprocess
        cmd = [sys.executable, os.path.abspath(__file__), "--serve-torch", "--B", str(args.B),
               "--H", str(args.H), "--sdpa-max-n", str(args.sdpa_max_n)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if args.keep_freed_memory:
            cmd += ["--keep-freed-memory"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.info = self.call("info")

    def call(self, *request):
        pickle.dump(request, self.proc.stdin)
        self.proc.stdin.flush()
        status, value = pickle.load(self.proc.stdout)
        if status != "ok":
            raise RuntimeError(f"torch worker: {value}")
        return value

    def timers(self, point):
        """(names, timers) of the torch calls of point (N, d, K, config, dtype)."""
        names = self.call("point", point)
        return names, [lambda name=name: self.call("time", name) for name in names]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def serve_torch(args):
    """The TorchWorker's loop: requests on stdin, (status, value) replies on stdout."""
    torch, _ = _import_torch()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from gma_np._allocator import keep_freed_memory
        keep_freed_memory()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr                              # prints must not reach the pipe
    timers = {}
    while True:
        try:
            request = pickle.load(inp)
        except EOFError:
            return
        try:
            if request[0] == "info":
                value = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
            elif request[0] == "point":
                N, d, K, config, dtype = request[1]
                causal, norm = _causal_norm(config)
                inputs = make_problem(N, d, K, d, args.B, args.H, dtype)
                fns = dict(zip(("torch_fwd", "torch_fwd_bwd"), torch_runners(inputs, causal, norm)))
                if N <= args.sdpa_max_n and norm == "row":
                    fns["sdpa_fwd_bwd"] = sdpa_runner(inputs, causal)
                timers = {name: steady_timer(fn) for name, fn in fns.items()}
                value = list(fns)
            else:                                        # ("time", name)
                value = timers[request[1]]()
            reply = ("ok", value)
        except Exception as err:                         # reported by the parent
            reply = ("error", f"{type(err).__name__}: {err}")
        pickle.dump(reply, out)
        out.flush()


def interleaved_medians(timers, repeats):
    """Median seconds of each timer (steady_timer, or a TorchWorker's), run in turn within
    each repeat, so that all see the same machine load."""
    for timer in timers:                                 # warm-up (Numba compile, allocators)
        timer()
    times = [[] for _ in timers]
    for _ in range(repeats):
        for i, timer in enumerate(timers):
            times[i].append(timer())
    return [float(np.median(t)) for t in times]


# ----------------------------------------------------------------------------- the table

def _causal_norm(config):
    """(causal, norm) of a configuration name such as "causal-row" or "bidir-slot"."""
    return config.startswith("causal"), config.split("-")[1]


def _runners(N, d, K, config, dtype, args):
    """The gma_np calls of one point: names and callables."""
    causal, norm = _causal_norm(config)
    inputs = make_problem(N, d, K, d, args.B, args.H, dtype)
    return ["fwd", "fwd_bwd"], list(gma_np_runners(inputs, causal, norm))


def time_point(N, d, K, config, dtype, args, worker=None):
    """Medians of the interleaved repeats of one point (glibc's default allocator settings):
    gma_np's calls here, torch's in the worker (None: no torch)."""
    names, fns = _runners(N, d, K, config, dtype, args)
    timers = [steady_timer(fn) for fn in fns]
    if worker is not None and N <= args.torch_max_n:
        torch_names, torch_timers = worker.timers((N, d, K, config, dtype))
        names, timers = names + torch_names, timers + torch_timers
    row = dict(config=config, dtype=dtype, N=N, d=d, K=K, e=d, B=args.B, H=args.H)
    row.update(zip(names, interleaved_medians(timers, args.repeats)))
    row["gflops"] = flops_model(N, d, K, d, args.H, args.B) / row["fwd_bwd"] / 1e9
    if "torch_fwd_bwd" in row:
        row["ratio"] = row["fwd_bwd"] / row["torch_fwd_bwd"]
        row["torch_gflops"] = flops_model(N, d, K, d, args.H, args.B) / row["torch_fwd_bwd"] / 1e9
    return row


def measure_memory(row, args):
    """Peak memory of fwd+bwd of one timed point, gma_np and torch, each measured in a
    fresh child process (see _memory_child): in one process, memory that one library
    (or an earlier point) freed but kept resident is reused by the next call, which
    then reads as using none of its own."""
    import subprocess
    for impl, key in (("gma_np", "peak_mb"), ("torch", "torch_peak_mb")):
        if impl == "torch" and "torch_fwd_bwd" not in row:
            continue
        point = json.dumps(dict(impl=impl, **{k: row[k] for k in ("config", "dtype", "N", "d", "K")}))
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", point,
               "--B", str(args.B), "--H", str(args.H)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode == 0:
            row[key] = float(res.stdout.strip().splitlines()[-1])
        else:
            print(f"(peak memory of {impl} {row['config']} N={row['N']} failed: "
                  f"{res.stderr.strip().splitlines()[-1:]})")


def _memory_child(point, args):
    """In a fresh process: one warm-up call (Numba's cache, first-touch), then the peak
    resident memory of one more fwd+bwd call, printed in MB."""
    _fixed_mmap_threshold()
    N, d, K, config, dtype = (point[k] for k in ("N", "d", "K", "config", "dtype"))
    if point["impl"] == "gma_np":
        fn = _runners(N, d, K, config, dtype, args)[1][1]
    else:
        if args.threads is not None:
            _import_torch()[0].set_num_threads(args.threads)
        inputs = make_problem(N, d, K, d, args.B, args.H, dtype)
        fn = torch_runners(inputs, *_causal_norm(config))[1]
    fn()
    if point["impl"] == "gma_np":
        # the scratch arrays gma_np keeps between calls (gma_np._workspace) are part of
        # what a call needs: dropped here, the measured call allocates them again
        from gma_np import _workspace
        _workspace.release()
    _fixed_mmap_threshold()                              # trim what the warm-up left free
    print(f"{peak_memory_mb(fn):.3f}")


def fmt_row(r):
    ms = lambda key: f"{1e3 * r[key]:9.1f}" if key in r else f"{'-':>9}"   # noqa: E731
    mb = lambda key: f"{r[key]:8.1f}" if key in r else f"{'-':>8}"         # noqa: E731
    ratio = f"{r['ratio']:6.2f}" if "ratio" in r else f"{'-':>6}"
    return (f"{r['config']:<12} {r['dtype']:<8} {r['N']:>6} {r['K']:>4} {r['d']:>4} "
            f"{ms('fwd')} {ms('fwd_bwd')} {r['gflops']:6.1f} {mb('peak_mb')} | "
            f"{ms('torch_fwd')} {ms('torch_fwd_bwd')} {ratio} {mb('torch_peak_mb')} | {ms('sdpa_fwd_bwd')}")


HEADER = (f"{'config':<12} {'dtype':<8} {'N':>6} {'K':>4} {'d':>4} {'fwd ms':>9} {'f+b ms':>9} "
          f"{'GF/s':>6} {'peak MB':>8} | {'torch fwd':>9} {'torch f+b':>9} {'ratio':>6} "
          f"{'torch MB':>8} | {'sdpa f+b':>9}")


def fitted_slope(rows, key, n_min=4096):
    """Slope of log(value) against log(N) over the rows with N >= n_min (None if < 2 points)."""
    pts = [(r["N"], r[key]) for r in rows if r["N"] >= n_min and key in r and r[key] > 0]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


# ----------------------------------------------------------------------------- decoding

def decode_tokens_per_second(positions, args, dtype="float32", steps=200):
    """gma_step throughput at given positions: (B*H tokens per step) / time per step."""
    d = e = args.d[0]
    K = args.K[0]
    B, H = args.B, args.H
    out = {}
    for pos in positions:
        inputs = make_problem(pos + steps, d, K, e, B, H, dtype, seed=1)
        mix = {n: inputs[n] for n in ("means", "log_var", "logits")}
        _, state = gma_np.gma_recurrent(inputs["q"][:, :, :pos], inputs["k"][:, :, :pos],
                                        inputs["v"][:, :, :pos], **mix)
        q, k, v = (inputs[n][:, :, pos:] for n in ("q", "k", "v"))
        gma_np.gma_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], **mix, state=state)   # warm-up
        t0 = time.perf_counter()
        for t in range(steps):
            _, state = gma_np.gma_step(q[:, :, t], k[:, :, t], v[:, :, t], **mix, state=state)
        dt = (time.perf_counter() - t0) / steps
        out[pos] = dict(us_per_step=1e6 * dt, tokens_per_s=B / dt, head_tokens_per_s=B * H / dt)
    return out


# ----------------------------------------------------------------------------- the plot

def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    groups = sorted({(r["config"], r["dtype"], r["K"], r["d"]) for r in rows})
    for g in groups:
        sel = sorted((r for r in rows if (r["config"], r["dtype"], r["K"], r["d"]) == g),
                     key=lambda r: r["N"])
        if len(sel) < 2:
            continue
        label = f"{g[0]} {g[1]}" + ("" if (g[2], g[3]) == (64, 64) else f" K{g[2]} d{g[3]}")
        for ax, key, tkey in ((ax_t, "fwd_bwd", "torch_fwd_bwd"), (ax_m, "peak_mb", "torch_peak_mb")):
            n = [r["N"] for r in sel]
            s = fitted_slope(sel, key)
            ax.loglog(n, [r[key] for r in sel], "o-", label=f"gma_np {label}"
                      + (f" (slope {s:.2f})" if s is not None else ""))
            if all(tkey in r for r in sel):
                s = fitted_slope(sel, tkey)
                ax.loglog(n, [r[tkey] for r in sel], "x--", label=f"torch {label}"
                          + (f" (slope {s:.2f})" if s is not None else ""))
    ax_t.set(xlabel="N", ylabel="forward+backward time (s)", title="time")
    ax_m.set(xlabel="N", ylabel="peak memory added (MB)", title="memory")
    for ax in (ax_t, ax_m):
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main

def main(args):
    import numba
    if args.threads is not None:
        # through gma_np, which quiets Numba's OpenMP workers first: numba.set_num_threads
        # alone would start them spinning (gma_np._threads, set_numba_threads)
        from gma_np._threads import set_numba_threads
        set_numba_threads(args.threads)
    if args.keep_freed_memory:
        from gma_np._allocator import keep_freed_memory
        print(f"C allocator keeps freed memory (both processes): {keep_freed_memory()}")
    worker = None
    if not args.no_torch and torch_available():
        worker = TorchWorker(args)
    print(f"gma_np {gma_np.__version__}, numpy {np.__version__}, numba {numba.__version__}"
          f" ({numba.get_num_threads()} threads), "
          f"{worker.info + ' in a subprocess' if worker is not None else 'torch not installed'}")
    print(f"B={args.B} H={args.H}, e = d; medians of {args.repeats} interleaved repeats; "
          f"ratio = gma_np f+b / torch f+b\n")
    points = [(N, d, K, config, dtype) for config in args.configs for dtype in args.dtypes
              for K in args.K for d in args.d for N in args.n]
    # Timing first, with glibc's default allocator (what a user runs with); then the
    # peak memory of every point, each in a child process with the fixed mmap
    # threshold that keeps RSS honest.
    # The threshold returns every freed block >= 64 KiB to the system, so with it
    # each large temporary costs fresh page faults: measured, it doubled the time of
    # both gma_np and torch at N = 8192, which is why timings never run under it.
    print("timing ...", flush=True)
    rows = []
    for pt in points:
        rows.append(time_point(*pt, args, worker))
        r = rows[-1]
        print(f"  timed {r['config']} {r['dtype']} N={r['N']} K={r['K']} d={r['d']}: "
              f"f+b {1e3 * r['fwd_bwd']:.1f} ms" + (f", torch {1e3 * r['torch_fwd_bwd']:.1f} ms"
                                                    if "torch_fwd_bwd" in r else ""), flush=True)
    print(HEADER)
    for r in rows:
        measure_memory(r, args)
        print(fmt_row(r), flush=True)
    print("\nfitted slopes in N (N >= 4096): time / peak memory")
    for g in sorted({(r["config"], r["dtype"], r["K"], r["d"]) for r in rows}):
        sel = [r for r in rows if (r["config"], r["dtype"], r["K"], r["d"]) == g]
        st, sm = fitted_slope(sel, "fwd_bwd"), fitted_slope(sel, "peak_mb")
        tt, tm = fitted_slope(sel, "torch_fwd_bwd"), fitted_slope(sel, "torch_peak_mb")
        f = lambda s: "-" if s is None else f"{s:.2f}"   # noqa: E731
        print(f"  {g[0]:<12} {g[1]:<8} K={g[2]:<4} d={g[3]:<4} gma_np {f(st)} / {f(sm)}"
              f"    torch {f(tt)} / {f(tm)}")
    decode = {}
    if not args.no_decode:
        positions = [100] if args.quick else [100, 4000]
        decode = decode_tokens_per_second(positions, args)
        print(f"\nrecurrent decoding, gma_step, B={args.B} H={args.H} d=e={args.d[0]} "
              f"K={args.K[0]} float32:")
        for pos, r in decode.items():
            print(f"  position {pos:>5}: {r['us_per_step']:8.1f} us/step, "
                  f"{r['tokens_per_s']:9.0f} tokens/s ({r['head_tokens_per_s']:.0f} head-tokens/s)")
    if worker is not None:
        worker.close()
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, decode=decode, args=vars(args)), f, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    if ARGS.memory_of:
        _memory_child(json.loads(ARGS.memory_of), ARGS)
    elif ARGS.serve_torch:
        serve_torch(ARGS)
    else:
        main(ARGS)
