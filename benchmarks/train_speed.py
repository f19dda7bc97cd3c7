"""Training speed: gma_np's training step against the same model in PyTorch, and where it goes.

    python benchmarks/train_speed.py                       # tiny and small (GMA), then every mixer at tiny
    python benchmarks/train_speed.py --presets tiny --blas-threads 1 2 --no-mixers
    python benchmarks/train_speed.py --no-torch            # gma_np alone

One step is the trainer's (gma_np.train.loop): the task's batch, `loss_and_grads`
(the body, the token head, the cross-entropy and back), `clip_grad_norm`, `lr_at` and
`AdamW.step`, on a model built and initialised from its first batch as `train()` does
it. The PyTorch twin (benchmarks/torch_model.py: the same parameters copied from the
gma_np model, autograd, torch.optim.AdamW, clip_grad_norm_, float32) runs in a
subprocess of its own with `--torch-threads` threads, so that neither library's thread
pools (Numba's OpenMP, torch's OpenMP and MKL) share a process with the other's; the
parent hands it the same batches and learning rates and waits while it steps.

Timing: every implementation (gma_np at each of `--blas-threads`, torch) steps its own
copy of the model through the same batches. Within each of `--repeats` rounds each
takes an untimed step, then a timed one, in turn, so all see the same machine load
and each timed step starts from its own steady state (as in bench_gma.py). The table
gives the median time per step, tokens/s (B x N tokens per step) and the ratio of
gma_np's tokens/s to torch's (above 1: gma_np is faster).

Where the time goes: `--profile-steps` more gma_np steps run with the layers'
functions wrapped by a timer (gma_np.nn.layers, the attention shell, the mixer's op and
its routing/memory stages, the head, the optimiser), and the table gives each one's
forward and backward milliseconds per step, nested as they are called; "(rest)" is the
part of a row that none of its children account for (Python glue, residual adds,
reshapes). The wrappers cost a few microseconds per call, a fraction of a percent.
"""

import argparse
import contextlib
import inspect
import multiprocessing
import os
import sys
import time
from collections import OrderedDict

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


def parse_args(argv=None):
    default_blas = inspect.signature(loop.train).parameters["blas_threads"].default
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], help="GMA presets to race")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median)")
    p.add_argument("--small-repeats", type=int, default=None,
                   help="timed steps for presets other than tiny (default: --repeats)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (Numba compile, allocators)")
    p.add_argument("--blas-threads", type=int, nargs="+", default=[default_blas],
                   help=f"BLAS threads of gma_np's step, one column each (default: the trainer's, "
                        f"{default_blas})")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads of the twin")
    p.add_argument("--no-torch", action="store_true", help="gma_np alone")
    p.add_argument("--no-mixers", action="store_true", help="skip every mixer at the tiny preset")
    p.add_argument("--mixers", nargs="+", default=list(MIXER_NAMES), help="mixers timed at tiny")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled gma_np steps (0 = none)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the torch twin

class TorchWorker:
    """The PyTorch twin in a subprocess (module docstring); None if torch is missing."""

    def __init__(self, threads):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_torch_serve, args=(child, threads), daemon=True)
        self.proc.start()
        ok, info = self.conn.recv()
        if not ok:
            self.proc.join()
            raise ImportError(info)
        self.info = info

    def call(self, *msg):
        self.conn.send(msg)
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"torch twin: {value}")
        return value

    def close(self):
        self.conn.send(("quit",))
        self.proc.join(timeout=10)


def _torch_serve(conn, threads):
    """The subprocess: build twins from gma_np models, step them, time the steps."""
    try:
        sys.path.insert(0, HERE)
        import torch
        from torch_model import TorchTwin
        torch.set_num_threads(threads)
    except ImportError as err:
        conn.send((False, str(err)))
        return
    conn.send((True, f"torch {torch.__version__}, {torch.get_num_threads()} threads"))
    twins = {}
    from gma_np.nn import LanguageModel
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "quit":
                return
            if msg[0] == "init":                    # (key, ModelConfig, params, TrainConfig)
                _, key, mcfg, params, tcfg = msg
                model = LanguageModel(mcfg, params=params)
                twins[key] = TorchTwin(model, torch.float32)
                twins[key].optimizer(tcfg)
                conn.send((True, None))
            elif msg[0] == "loss":                  # (key, params, ModelConfig, idx, targets, dtype)
                _, mcfg, params, idx, targets, dtype = msg
                twin = TorchTwin(LanguageModel(mcfg, params=params), getattr(torch, dtype))
                with torch.no_grad():
                    conn.send((True, float(twin.loss(idx, targets))))
            elif msg[0] == "step":                  # (key, idx, targets, lr, max_norm)
                _, key, idx, targets, lr, max_norm = msg
                t0 = time.perf_counter()
                loss = twins[key].step(idx, targets, lr, max_norm)
                conn.send((True, (loss, time.perf_counter() - t0)))
            else:
                conn.send((False, f"unknown message {msg[0]!r}"))
        except Exception as err:                    # report, keep serving
            conn.send((False, f"{type(err).__name__}: {err}"))


# ----------------------------------------------------------------------------- gma_np's step

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
    the phase of the call it runs in (phase "inherit": split/merge of heads)."""

    def __init__(self):
        self.stack = []                     # [(label, phase)] of the calls under way
        self.times = OrderedDict()          # path -> {"fwd": s, "bwd": s, "calls": n}
        self.patches = []

    @contextlib.contextmanager
    def region(self, label, phase):
        if phase == "inherit":
            phase = self.stack[-1][1] if self.stack else "fwd"
        self.stack.append((label, phase))
        path = tuple(lab for lab, _ in self.stack)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.stack.pop()
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

def race(cfg, args, worker, repeats, label):
    """Time gma_np (at each BLAS thread count) and the torch twin, interleaved; print the table."""
    task, model, opt, rng = build_run(cfg)
    n_steps = args.warmup + 2 * repeats + args.profile_steps + 1
    batches = [task.sample_batch("train", cfg.batch_size, rng) for _ in range(n_steps)]
    tokens = batches[0].tokens.size
    impls = OrderedDict()
    for b in args.blas_threads:
        m, o = copy_run(cfg, model)
        impls[f"gma_np blas={b}"] = ("gma_np", b, m, o)
    use_torch = worker is not None and _has_twin(cfg.model.mixer)
    if use_torch:
        worker.call("init", label, model.cfg, model.params, cfg)
        impls[f"torch ({worker.info.split(',')[1].strip()})"] = ("torch", None, None, None)
        # the same initial loss: gma_np's on the first timed batch against the twin's
        b0 = batches[0]
        with blas_threads(args.blas_threads[0]):
            ref = model.loss(b0.tokens, b0.targets)
        l32 = worker.call("loss", model.cfg, model.params, b0.tokens, b0.targets, "float32")
        l64 = worker.call("loss", model.cfg, model.params, b0.tokens, b0.targets, "float64")
        print(f"  initial loss: gma_np {ref:.9f}, torch float32 {l32:.9f} (diff {ref - l32:+.1e}), "
              f"float64 {l64:.9f} (diff {ref - l64:+.1e})")
    counters = {name: 0 for name in impls}

    def run(name):
        kind, b, m, o = impls[name]
        i = counters[name]
        counters[name] += 1
        batch = batches[i]
        if kind == "torch":
            lr = lr_at(i, cfg.lr, cfg.warmup_steps, cfg.schedule_steps, cfg.min_lr_ratio)
            return worker.call("step", label, batch.tokens, batch.targets, lr, cfg.grad_clip)[1]
        with blas_threads(b):
            t0 = time.perf_counter()
            gma_np_step(cfg, task, m, o, batch, i)
            return time.perf_counter() - t0

    for name in impls:
        for _ in range(args.warmup):
            run(name)
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name in impls:
            run(name)                              # untimed: this implementation's steady state
            times[name].append(run(name))
    med = {name: float(np.median(t)) for name, t in times.items()}
    torch_name = next((n for n in impls if n.startswith("torch")), None)
    print(f"  {'implementation':<28} {'ms/step':>9} {'min':>9} {'max':>9} {'tokens/s':>10} "
          f"{'vs torch':>9}")
    for name in impls:
        tps = tokens / med[name]
        ratio = "" if torch_name is None else f"{med[torch_name] / med[name]:8.2f}x"
        print(f"  {name:<28} {med[name] * 1e3:9.1f} {min(times[name]) * 1e3:9.1f} "
              f"{max(times[name]) * 1e3:9.1f} {tps:10,.0f} {ratio:>9}")
    result = {"tokens": tokens, "median_s": med}

    if args.profile_steps:
        name = next(iter(impls))
        _, b, m, o = impls[name]
        prof = Profiler()
        prof.instrument(cfg.model.mixer)
        try:
            t_total = 0.0
            with blas_threads(b):
                for _ in range(args.profile_steps):
                    i = counters[name]
                    counters[name] += 1
                    t0 = time.perf_counter()
                    gma_np_step(cfg, task, m, o, batches[i], i, prof)
                    t_total += time.perf_counter() - t0
        finally:
            prof.unpatch()
        print(f"  where gma_np's step goes ({name}, mean of {args.profile_steps} profiled steps, "
              f"ms per step):")
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
    worker = None
    if not args.no_torch:
        try:
            worker = TorchWorker(args.torch_threads)
            print(f"PyTorch twin: {worker.info} (a subprocess)")
        except ImportError as err:
            print(f"PyTorch twin: not available ({err}); gma_np alone")
    import numba
    print(f"gma_np: Numba {numba.get_num_threads()} threads; BLAS threads per column; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    try:
        for name in args.presets:
            cfg = preset(name)
            repeats = args.repeats if name == "tiny" else (args.small_repeats or args.repeats)
            print(f"\npreset {name}: {_describe(cfg)}, median of {repeats}")
            race(cfg, args, worker, repeats, name)
        if not args.no_mixers:
            for mixer in args.mixers:
                if mixer == "gma" and "tiny" in args.presets:
                    continue                            # timed above
                cfg = preset("tiny", mixer=mixer)
                print(f"\npreset tiny, mixer {mixer}: {_describe(cfg)}, median of {args.repeats}")
                race(cfg, args, worker, args.repeats, f"tiny-{mixer}")
    finally:
        if worker is not None:
            worker.close()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
