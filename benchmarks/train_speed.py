"""Training speed: gma_np's training step against the same model in PyTorch, and where it goes.

    python benchmarks/train_speed.py                       # tiny and small (GMA), then every mixer at tiny
    python benchmarks/train_speed.py --presets tiny --blas-threads 1 2 --no-mixers
    python benchmarks/train_speed.py --no-torch            # gma_np alone
    python benchmarks/train_speed.py --compare ../before   # and the gma_np of another checkout

One step is the trainer's (gma_np.train.loop): the task's batch, `loss_and_grads`
(the body, the token head, the cross-entropy and back), `clip_grad_norm`, `lr_at` and
`AdamW.step`, on a model built and initialised from its first batch as `train()` does
it. Every timed implementation runs in a subprocess of its own, the parent handing
each the same batches and waiting while it steps: this checkout's gma_np; the gma_np
of another checkout (`--compare DIR`: before and after a change, DIR first on its
path); the PyTorch twin (benchmarks/torch_model.py: the same parameters copied from
the gma_np model, autograd, torch.optim.AdamW, clip_grad_norm_, float32) with
`--torch-threads` threads. So no library's thread pools (Numba's OpenMP, torch's
OpenMP and MKL) share a process with another's, and each process is alike (the same
code measured in the parent and in a subprocess differed by 15% in one run). A gma_np
process gets what train() sets in its own before the first step, the C allocator keeping
freed blocks (gma_np._allocator); the twin runs as a PyTorch user runs it, unless
--twin-keeps-freed-memory gives it the same setting.

Timing: every implementation (gma_np at each of `--blas-threads`, torch) steps its own
copy of the model through the same batches. Within each of `--repeats` rounds each
takes an untimed step, then a timed one, in turn, so all see the same machine load
and each timed step starts from its own steady state (as in bench_gma.py). The table
gives the median time per step, tokens/s (B x N tokens per step) and the ratio of
gma_np's tokens/s to the fastest twin's (above 1: gma_np is faster).

Where the time goes: `--profile-steps` steps of this checkout's gma_np, in the parent
(after PROFILE_WARMUP untimed steps), run with the layers' functions wrapped by a timer
(gma_np.nn.layers, the attention shell, the mixer's op and
its routing/memory stages, the head, the optimiser), and the table gives each one's
forward and backward milliseconds per step, nested as they are called; "(rest)" is the
part of a row that none of its children account for (Python glue, residual adds,
reshapes). The wrappers cost a few microseconds per call, a fraction of a percent.
When the step runs its batch's shards on two threads (gma_np.train.loop, BATCH_SHARDS),
the calls of the two shards overlap in time: each row is then the CPU time of the thread
that made the call (time.thread_time), summed over the shards, and the total the
process's CPU time; work a row hands to other threads (AdamW's two streams) falls under
"outside every row".
"""

import argparse
import contextlib
import inspect
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import OrderedDict

import numba
import numpy as np

try:
    import gma_np  # noqa: F401
except ImportError:                                     # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gma_np._threads import blas_threads
from gma_np.mixers import MIXER_NAMES, get_mixer
from gma_np.nn import heads as heads_module
from gma_np.nn import layers as L
from gma_np.optim import clip_grad_norm, lr_at
from gma_np.train import loop
from gma_np.train.config import preset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)                # this checkout, the one timed first
# Untimed steps of a fresh copy of the model before the profiled ones: the first steps
# of a process are not yet its steady state (a tiny-preset step took 194-206 ms after one
# step, 128-141 after five, the profiler's wrappers costing nothing measurable either way).
PROFILE_WARMUP = 5
# set in the twin's environment by --twin-keeps-freed-memory
TWIN_ALLOCATOR_ENV = "GMA_NP_BENCH_TWIN_KEEPS_FREED_MEMORY"


def parse_args(argv=None):
    default_blas = inspect.signature(loop.train).parameters["blas_threads"].default
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="*", default=["tiny", "small"], help="GMA presets to race")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median)")
    p.add_argument("--small-repeats", type=int, default=None,
                   help="timed steps for presets other than tiny (default: --repeats)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (Numba compile, allocators)")
    p.add_argument("--blas-threads", type=int, nargs="+", default=[default_blas],
                   help=f"BLAS threads of gma_np's step, one column each (default: the trainer's, "
                        f"{default_blas})")
    p.add_argument("--torch-threads", type=int, nargs="+", default=[2],
                   help="torch.set_num_threads of the twin, one twin (a subprocess) each")
    p.add_argument("--no-torch", action="store_true", help="gma_np alone")
    p.add_argument("--no-mixers", action="store_true", help="skip every mixer at the tiny preset")
    p.add_argument("--mixers", nargs="+", default=list(MIXER_NAMES), help="mixers timed at tiny")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled gma_np steps (0 = none)")
    p.add_argument("--compare", nargs="+", default=[], metavar="CHECKOUT",
                   help="also time the gma_np of these checkouts (directories holding gma_np/), "
                        "each in a subprocess: before/after a change, in one run")
    p.add_argument("--unsplit-too", action="store_true",
                   help="also time this checkout with every matrix product whole "
                        "(gma_np.nn.layers.MATMUL_SPLIT_MIN_WORK out of reach)")
    p.add_argument("--twin-keeps-freed-memory", action="store_true",
                   help="give the torch twin's process the C allocator setting train() gives its "
                        "own (gma_np._allocator); by default the twin runs as a PyTorch user runs it")
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the torch twin

class Worker:
    """A timed implementation in a subprocess of its own: "torch" (the twin) or "gma_np"
    (the gma_np of another checkout, --compare). Messages are pickled over its stdin and
    stdout; the subprocess prints to stderr."""

    def __init__(self, kind, arg, keep_freed_memory=False):
        env = dict(os.environ)
        if keep_freed_memory:
            env[TWIN_ALLOCATOR_ENV] = "1"
        if kind in ("gma_np", "gma_np-unsplit"):      # that checkout's gma_np first on the path
            env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(arg)] +
                                                 env.get("PYTHONPATH", "").split(os.pathsep))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind,
                                      str(arg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        ok, info = self._recv()
        if not ok:
            self.proc.wait()
            raise ImportError(info)
        self.info = info

    def _recv(self):
        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            return False, "the subprocess ended"

    def call(self, *msg):
        pickle.dump(msg, self.proc.stdin)
        self.proc.stdin.flush()
        ok, value = self._recv()
        if not ok:
            raise RuntimeError(f"{self.info}: {value}")
        return value

    def close(self):
        try:
            self.call("quit")
        except (RuntimeError, BrokenPipeError):
            pass
        self.proc.wait(timeout=30)


def _serve(kind, arg):
    """The subprocess's loop (Worker): build, step and time one implementation."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr

    def send(ok, value):
        pickle.dump((ok, value), out)
        out.flush()
    runs = {}
    try:
        if kind == "torch":
            sys.path.insert(0, HERE)
            import torch
            from torch_model import TorchTwin
            torch.set_num_threads(int(arg))
            send(True, f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        else:
            import gma_np as other
            where = os.path.dirname(os.path.dirname(other.__file__))
            if kind == "gma_np-unsplit":              # every matrix product whole
                from gma_np.nn import layers
                layers.MATMUL_SPLIT_MIN_WORK = sys.maxsize
                where += " (products not split)"
            send(True, f"gma_np {where}")
    except ImportError as err:
        send(False, str(err))
        return
    from gma_np.nn import LanguageModel
    while True:
        msg = pickle.load(sys.stdin.buffer)
        try:
            if msg[0] == "quit":
                send(True, None)
                return
            if msg[0] == "init" and kind == "torch":      # (key, ModelConfig, params, TrainConfig)
                _, key, mcfg, params, tcfg = msg
                if os.environ.get(TWIN_ALLOCATOR_ENV) == "1":
                    from gma_np._allocator import keep_freed_memory
                    keep_freed_memory()
                runs[key] = TorchTwin(LanguageModel(mcfg, params=params), torch.float32)
                runs[key].optimizer(tcfg)
                send(True, None)
            elif msg[0] == "init":                        # (key, TrainConfig dict, blas threads)
                _, key, cfg_dict, blas = msg
                from gma_np.train.config import TrainConfig
                _trainer_process()
                cfg = TrainConfig.from_dict(cfg_dict)
                runs[key] = (cfg, blas) + build_run(cfg)
                send(True, None)
            elif msg[0] == "loss":                        # (ModelConfig, params, idx, targets, dtype)
                _, mcfg, params, idx, targets, dtype = msg
                twin = TorchTwin(LanguageModel(mcfg, params=params), getattr(torch, dtype))
                with torch.no_grad():
                    send(True, float(twin.loss(idx, targets)))
            elif msg[0] == "step":                        # (key, batch, lr, max_norm, step)
                _, key, batch, lr, max_norm, i = msg
                if kind == "torch":
                    t0 = time.perf_counter()
                    runs[key].step(batch.tokens, batch.targets, lr, max_norm)
                    send(True, time.perf_counter() - t0)
                else:
                    cfg, blas, task, model, opt, _ = runs[key]
                    with blas_threads(blas):
                        t0 = time.perf_counter()
                        gma_np_step(cfg, task, model, opt, batch, i)
                        dt = time.perf_counter() - t0
                    send(True, dt)
            else:
                send(False, f"unknown message {msg[0]!r}")
        except Exception as err:                          # report, keep serving
            send(False, f"{type(err).__name__}: {err}")


# ----------------------------------------------------------------------------- gma_np's step

def _trainer_process():
    """What train() sets in its process before the first step: the C allocator keeps freed
    blocks (gma_np._allocator; an older checkout without it: nothing)."""
    try:
        from gma_np._allocator import keep_freed_memory
    except ImportError:
        return
    keep_freed_memory()


def build_run(cfg):
    """(task, model, optimizer, batches source) as train() builds them for a fresh run."""
    task = loop.build_task(cfg)
    model, opt = loop.build(cfg, task.head)
    rng = np.random.default_rng(cfg.seed)
    first = task.sample_batch("train", cfg.batch_size, rng)
    model.init_from_data(first.tokens, np.random.default_rng(cfg.seed + 1), causal=task.causal,
                         key_mask=first.key_mask)
    return task, model, opt, rng


def copy_run(cfg, model):
    """A fresh model with model's parameters, and its own optimizer."""
    twin = loop.LanguageModel(model.cfg, params={n: a.copy() for n, a in model.params.items()},
                              buffers={n: a.copy() for n, a in model.buffers.items()},
                              head=model.head)
    return twin, loop._optimizer(cfg, twin)


def gma_np_step(cfg, task, model, opt, batch, step, profiler=None):
    """The trainer's step (gma_np.train.loop.train's loop body, without its bookkeeping)."""
    prof = profiler or _NoProfile()
    loss, grads = loop.loss_and_grads(model, task, batch)
    with prof.region("clip_grad_norm", "fwd"):
        clip_grad_norm(grads, cfg.grad_clip)
    lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.schedule_steps, cfg.min_lr_ratio)
    with prof.region("AdamW.step", "fwd"):
        opt.step(model.params, grads, lr)
    return loss


# ----------------------------------------------------------------------------- the profiler

class _NoProfile:
    def region(self, label, phase):
        return contextlib.nullcontext()


class Profiler:
    """Inclusive times of wrapped functions, keyed by the path of enclosing wrapped calls.

    A wrapped function is a forward ("fwd") or backward ("bwd") row by its name, or takes
    the phase of the call it runs in (phase "inherit": split/merge of heads). Each thread
    keeps its own stack of calls under way (the batch's shards run on threads of their
    own), and the rows add up the threads' times. clock: time.perf_counter (wall) or
    time.thread_time (the CPU time of the calling thread, which with shards on threads of
    their own is what each row cost its core)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.local = threading.local()      # .stack: [(label, phase)] of this thread's calls
        self.lock = threading.Lock()
        self.times = OrderedDict()          # path -> {"fwd": s, "bwd": s, "calls": n}
        self.patches = []

    @contextlib.contextmanager
    def region(self, label, phase):
        stack = self.local.__dict__.setdefault("stack", [])
        if phase == "inherit":
            phase = stack[-1][1] if stack else "fwd"
        stack.append((label, phase))
        path = tuple(lab for lab, _ in stack)
        t0 = self.clock()
        try:
            yield
        finally:
            dt = self.clock() - t0
            stack.pop()
            with self.lock:
                row = self.times.setdefault(path, {"fwd": 0.0, "bwd": 0.0, "calls": 0})
                row[phase] += dt
                row["calls"] += 1

    def wrap(self, owner, attr, label, phase=None):
        """Replace owner.attr by a timed version (restored by unpatch)."""
        fn = getattr(owner, attr)
        ph = phase or ("bwd" if "backward" in attr else "fwd")

        def timed(*args, **kwargs):
            with self.region(label, ph):
                return fn(*args, **kwargs)
        object.__setattr__(owner, attr, timed)          # object.__setattr__: Mixer is frozen
        self.patches.append((owner, attr, fn))

    def unpatch(self):
        for owner, attr, fn in reversed(self.patches):
            object.__setattr__(owner, attr, fn)
        self.patches.clear()

    def instrument(self, mixer_name):
        """Wrap the functions one training step of the language model calls."""
        for attr in ("body_forward", "body_backward"):
            self.wrap(loop, attr, "body")
        for attr in ("token_head_forward", "token_head_backward"):
            self.wrap(heads_module, attr, "head")
        for base, label in (("embedding", "embedding wte"), ("position", "embedding wpe"),
                            ("layernorm", "layernorm"), ("causal_conv", "conv"), ("mlp", "mlp"),
                            ("linear", "linear"), ("gelu", "gelu"),
                            ("cross_entropy", "cross-entropy")):
            for suffix in ("_forward", "_backward"):
                self.wrap(L, base + suffix, label)
        mixer = get_mixer(mixer_name)
        self.wrap(mixer, "forward", f"mixer {mixer_name}", "fwd")
        self.wrap(mixer, "backward", f"mixer {mixer_name}", "bwd")
        from gma_np.mixers import attention
        if mixer_name != "mamba":                       # the attention-style mixers' shell
            for attr in ("linear_forward", "linear_backward"):
                self.wrap(attention, attr, "projections q,k,v,o")
            self.wrap(attention, "split_heads", "split/merge heads", "inherit")
            self.wrap(attention, "merge_heads", "split/merge heads", "inherit")
            for attr in ("split_qkv", "merge_qkv"):     # the fused q, k, v projection's
                if hasattr(attention, attr):
                    self.wrap(attention, attr, "split/merge heads", "inherit")
        if mixer_name == "gma":
            from gma_np.mixers.gma import core, mixing
            self.wrap(core, "gma_forward", "gma op")
            self.wrap(core, "gma_backward", "gma op")
            self.wrap(mixing, "route_forward", "routing")
            self.wrap(mixing, "route_backward", "routing")
            for attr in ("_causal_forward", "_causal_backward", "causal_chunked_forward",
                         "causal_chunked_backward"):
                self.wrap(mixing, attr, "memory (causal)")

    def table(self, n_steps, total_s):
        """Lines: every path with its forward and backward ms per step, children indented."""
        rows, ms = self.times, 1e3 / n_steps
        lines = [f"  {'where':<40} {'fwd ms':>8} {'bwd ms':>8} {'total':>8} {'share':>6} "
                 f"{'calls':>6}"]

        def line(name, f, b, t, calls=""):
            fb = (f"{f * ms:8.1f} {b * ms:8.1f}" if f is not None else f"{'':>8} {'':>8}")
            lines.append(f"  {name:<40} {fb} {t * ms:8.1f} {100 * t / total_s:5.1f}% {calls:>6}")

        def emit(path):
            row = rows[path]
            t = row["fwd"] + row["bwd"]
            line("  " * (len(path) - 1) + path[-1], row["fwd"], row["bwd"], t,
                 str(row["calls"] // n_steps))
            kids = [p for p in rows if len(p) == len(path) + 1 and p[:-1] == path]
            for k in kids:
                emit(k)
            if kids:
                rf = row["fwd"] - sum(rows[k]["fwd"] for k in kids)
                rb = row["bwd"] - sum(rows[k]["bwd"] for k in kids)
                if abs(rf + rb) * ms >= 0.05:
                    line("  " * len(path) + "(rest)", rf, rb, rf + rb)
        tops = [p for p in rows if len(p) == 1]
        for p in tops:
            emit(p)
        outside = total_s - sum(rows[p]["fwd"] + rows[p]["bwd"] for p in tops)
        line("(outside every row: lr, Python)", None, None, outside)
        line("step, profiled", None, None, total_s)
        return lines


# ----------------------------------------------------------------------------- one preset

def race(cfg, args, workers, repeats, label):
    """Time gma_np (at each BLAS thread count, and the --compare checkouts) and the torch
    twin, interleaved; print the table and the profile."""
    task, model, opt, rng = build_run(cfg)
    n_steps = max(args.warmup + 2 * repeats, args.profile_steps + 1)
    batches = [task.sample_batch("train", cfg.batch_size, rng) for _ in range(n_steps)]
    tokens = batches[0].tokens.size
    impls = OrderedDict()
    for path, w in workers["gma_np"]:
        which = "" if path == ROOT else " " + os.path.basename(os.path.normpath(path))
        for b in args.blas_threads:
            w.call("init", (label, b), cfg.to_dict(), b)
            impls[f"gma_np{which} blas={b}"] = ("worker", b, w, None)
    twins = workers["torch"] if _has_twin(cfg.model.mixer) else []
    for twin in twins:
        twin.call("init", label, model.cfg, model.params, cfg)
        impls[f"torch ({twin.info.split(',')[1].strip()})"] = ("torch", None, twin, None)
    if twins:
        # the same initial loss: gma_np's on the first batch against the twin's
        twin = twins[0]
        b0 = batches[0]
        with blas_threads(args.blas_threads[0]):
            ref = model.loss(b0.tokens, b0.targets)
        l32 = twin.call("loss", model.cfg, model.params, b0.tokens, b0.targets, "float32")
        l64 = twin.call("loss", model.cfg, model.params, b0.tokens, b0.targets, "float64")
        print(f"  initial loss: gma_np {ref:.9f}, torch float32 {l32:.9f} (diff {ref - l32:+.1e}), "
              f"float64 {l64:.9f} (diff {ref - l64:+.1e})")
    counters = {name: 0 for name in impls}

    def run(name):
        kind, b, m, o = impls[name]
        i = counters[name]
        counters[name] += 1
        batch = batches[i]
        lr = lr_at(i, cfg.lr, cfg.warmup_steps, cfg.schedule_steps, cfg.min_lr_ratio)
        if kind == "torch":
            return m.call("step", label, batch, lr, cfg.grad_clip, i)
        return m.call("step", (label, b), batch, lr, cfg.grad_clip, i)

    for name in impls:
        for _ in range(args.warmup):
            run(name)
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name in impls:
            run(name)                              # untimed: this implementation's steady state
            times[name].append(run(name))
    med = {name: float(np.median(t)) for name, t in times.items()}
    torch_names = [n for n in impls if n.startswith("torch")]
    # the ratio is against the fastest twin (the one a PyTorch user would keep)
    torch_name = min(torch_names, key=med.get) if torch_names else None
    print(f"  {'implementation':<34} {'ms/step':>9} {'min':>9} {'max':>9} {'tokens/s':>10} "
          f"{'vs torch':>9}")
    for name in impls:
        tps = tokens / med[name]
        ratio = "" if torch_name is None else f"{med[torch_name] / med[name]:8.2f}x"
        print(f"  {name:<34} {med[name] * 1e3:9.1f} {min(times[name]) * 1e3:9.1f} "
              f"{max(times[name]) * 1e3:9.1f} {tps:10,.0f} {ratio:>9}")
    result = {"tokens": tokens, "median_s": med}

    if args.profile_steps:
        # in this process: this checkout's gma_np, after PROFILE_WARMUP untimed steps
        b = args.blas_threads[0]
        m, o = copy_run(cfg, model)
        _trainer_process()
        # with the batch's shards on threads of their own (gma_np.train.loop, BATCH_SHARDS),
        # wall times of concurrent calls would overlap: then the rows are each thread's CPU
        # time, and the total is the process's
        sharded = numba.get_num_threads() > 1 and len(loop._shards(batches[0])) > 1
        prof = Profiler(time.thread_time if sharded else time.perf_counter)
        total_clock = time.process_time if sharded else time.perf_counter
        t_total, t_wall = 0.0, 0.0
        with blas_threads(b):
            for i in range(PROFILE_WARMUP):
                gma_np_step(cfg, task, m, o, batches[i % len(batches)], i)
            prof.instrument(cfg.model.mixer)
            try:
                for i in range(PROFILE_WARMUP, PROFILE_WARMUP + args.profile_steps):
                    t0, w0 = total_clock(), time.perf_counter()
                    gma_np_step(cfg, task, m, o, batches[i % len(batches)], i, prof)
                    t_total += total_clock() - t0
                    t_wall += time.perf_counter() - w0
            finally:
                prof.unpatch()
        unit = "CPU ms of the thread running each call, summed over the shards" if sharded else "ms"
        print(f"  where gma_np's step goes (blas={b}, mean of {args.profile_steps} profiled steps, "
              f"{unit} per step; {t_wall / args.profile_steps * 1e3:.1f} ms wall a step):")
        for line in prof.table(args.profile_steps, t_total):
            print(line)
    return result


def _has_twin(mixer):
    sys.path.insert(0, HERE)
    try:
        import torch_model
        return torch_model.has_twin(mixer)
    except ImportError:
        return mixer in ("gma", "softmax")


def _describe(cfg):
    m = cfg.model
    return (f"{m.mixer}, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, "
            f"K {m.n_components}, B {cfg.batch_size} x N {cfg.context} = "
            f"{cfg.batch_size * cfg.context} tokens/step, {m.dtype}")


def main(argv=None):
    args = parse_args(argv)
    if args.serve:
        return _serve(*args.serve)
    workers = {"gma_np": [], "torch": []}
    try:
        for kind, path in ([("gma_np", ROOT)] + [("gma_np-unsplit", ROOT)] * args.unsplit_too
                           + [("gma_np", p) for p in args.compare]):
            w = Worker(kind, path)
            workers["gma_np"].append((path if kind == "gma_np" else "unsplit", w))
            print(f"timed: {w.info} (a subprocess)")
        for threads in ([] if args.no_torch else args.torch_threads):
            try:
                workers["torch"].append(Worker("torch", threads, args.twin_keeps_freed_memory))
                print(f"PyTorch twin: {workers['torch'][-1].info} (a subprocess)")
            except ImportError as err:
                print(f"PyTorch twin: not available ({err}); gma_np alone")
                break
        print(f"gma_np: Numba {numba.get_num_threads()} threads; BLAS threads per row; "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
        for name in args.presets:
            cfg = preset(name)
            repeats = args.repeats if name == "tiny" else (args.small_repeats or args.repeats)
            print(f"\npreset {name}: {_describe(cfg)}, median of {repeats}")
            race(cfg, args, workers, repeats, name)
        if not args.no_mixers:
            for mixer in args.mixers:
                if mixer == "gma" and "tiny" in args.presets:
                    continue                            # timed above
                cfg = preset("tiny", mixer=mixer)
                print(f"\npreset tiny, mixer {mixer}: {_describe(cfg)}, median of {args.repeats}")
                race(cfg, args, workers, args.repeats, f"tiny-{mixer}")
    finally:
        for w in [w for _, w in workers["gma_np"]] + workers["torch"]:
            w.close()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
