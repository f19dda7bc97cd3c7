"""Time and memory of one mixer layer against the sequence length N, and the fitted slopes.

Dimension legend: B batch, N tokens, D model width.

For each mixer and each N of the spec, one layer of the mixer (through its contract,
gma_np.mixers.get_mixer: the projections and the core, as the model runs it) does
forward + backward on x (B, N, D) ~ normal(0, 1) in the model's dtype, causal, with
the parameters of its own initialisation (and, for GMA, the mixture fitted to those
keys, as training starts). Per N:

    cpu_s      the CPU time of the process (time.process_time) of the fastest timed
               forward + backward step (at least `steps` of them, and more until
               MIN_TIMED_S of CPU time is spent), after one untimed warm-up step (Numba's
               first call loads or compiles its kernels). CPU time, not wall time: on a
               shared machine the wall time of a single-threaded step grows with the
               other processes' load (4x at a load average of 8 on 2 cores, measured),
               its CPU time barely; the fastest, because interference only ever adds
    time_s     the wall time (time.perf_counter) of the fastest step, and median_s the
               median wall time, for the record
    memory_b   the peak of the bytes allocated during one more forward + backward step
               (cache and gradients included), above what was allocated before it,
               measured with tracemalloc in a step of its own, so the tracing does not
               slow the timed ones. NumPy reports its array buffers to tracemalloc; the
               Numba kernels' own scratch arrays (a few rows each) are not seen.

The slope of log(cpu_s) and log(memory) against log(N) is fitted by least squares
(`fit_slope`): about 1 for a linear-time mixer (GMA, linear, performer, mamba), about
2 for softmax attention's time once N dominates its constant costs.
"""

import math
import statistics
import time
import tracemalloc
from dataclasses import asdict, dataclass, field

import numpy as np

# The layout of a measurement's record; a record of another format is measured again.
FORMAT = 2
# Seconds of timed steps at least per N: at small N one step takes ~2 ms, and a handful of
# them is one scheduler slice of a loaded machine.
MIN_TIMED_S = 0.25

# Fields of the spec besides "model"; "model" holds ModelConfig fields of the layer.
SPEC_KEYS = ("mixers", "lengths", "batch_size", "steps", "model", "fit_from")


@dataclass(frozen=True)
class ScalingSpec:
    mixers: tuple                         # mixer names
    lengths: tuple                        # the N, increasing
    batch_size: int = 1                   # B
    steps: int = 3                        # timed forward + backward steps per N, at least
    model: dict = field(default_factory=dict)   # ModelConfig fields of the layer
    fit_from: int = 0                     # fit the slopes over N >= this (0: every N)

    @classmethod
    def from_dict(cls, d, where="scaling"):
        from gma_np.sweep.grid import GridError
        if not isinstance(d, dict):
            raise GridError(f"{where}: expected a table, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SPEC_KEYS))
        if unknown:
            raise GridError(f"{where}: unknown key {unknown[0]!r}; the keys are "
                            f"{', '.join(SPEC_KEYS)}")
        from gma_np.mixers import MIXER_NAMES
        mixers = tuple(d.get("mixers", ()))
        bad = [m for m in mixers if m not in MIXER_NAMES]
        if not mixers or bad:
            raise GridError(f"{where}.mixers: expected a list of {', '.join(MIXER_NAMES)}, "
                            f"got {d.get('mixers')!r}")
        lengths = tuple(d.get("lengths", ()))
        if (len(lengths) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 2
                                    for n in lengths) or list(lengths) != sorted(set(lengths))):
            raise GridError(f"{where}.lengths: expected two or more increasing integers >= 2, "
                            f"got {d.get('lengths')!r}")
        for key in ("batch_size", "steps"):
            v = d.get(key, 1 if key == "batch_size" else 3)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GridError(f"{where}.{key}: expected a positive integer, got {v!r}")
        fit_from = d.get("fit_from", 0)
        if isinstance(fit_from, bool) or not isinstance(fit_from, int) or fit_from < 0:
            raise GridError(f"{where}.fit_from: expected an integer >= 0, got {fit_from!r}")
        if sum(n >= fit_from for n in lengths) < 2:
            raise GridError(f"{where}.fit_from: {fit_from} leaves fewer than two lengths to fit")
        spec = cls(mixers=mixers, lengths=lengths, batch_size=d.get("batch_size", 1),
                   steps=d.get("steps", 3), model=dict(d.get("model", {})), fit_from=fit_from)
        for m in mixers:                          # the layer's config, checked now
            try:
                spec.model_config(m, lengths[-1])
            except (TypeError, ValueError) as err:
                raise GridError(f"{where}.model: {err}") from None
        return spec

    def model_config(self, mixer, n):
        from gma_np.nn import ModelConfig
        return ModelConfig(**{**self.model, "mixer": mixer, "max_len": n})

    def to_dict(self):
        d = asdict(self)
        d["mixers"], d["lengths"] = list(self.mixers), list(self.lengths)
        return d


def _layer(mixer_name, cfg, x, rng):
    """The layer's parameters and buffers (cast to the dtype), with data-dependent ones set."""
    from gma_np.mixers import get_mixer
    mixer = get_mixer(mixer_name)
    dtype = np.dtype(cfg.dtype)
    p = {**mixer.init_parameters(cfg, rng), **mixer.init_buffers(cfg, rng)}
    p = {k: v.astype(dtype) for k, v in p.items()}
    if mixer.init_from_data is not None:
        p.update({k: np.asarray(v, dtype=dtype)
                  for k, v in mixer.init_from_data(x, p, cfg, rng).items()})
    return mixer, p


def _step(mixer, x, p, cfg, dy):
    y, cache = mixer.forward(x, p, cfg, causal=True)            # (B, N, D)
    dx, grads = mixer.backward(dy, cache)                        # (B, N, D), {name: array}
    return y, dx, grads


def measure_mixer(spec, mixer_name, seed=0):
    """{"format", "mixer", "lengths", "cpu_s", "time_s", "median_s", "memory_b", "dtype",
    "threads"} of one mixer (module docstring)."""
    import numba
    out = {"format": FORMAT, "mixer": mixer_name, "lengths": [], "cpu_s": [], "time_s": [],
           "median_s": [], "memory_b": []}
    for n in spec.lengths:
        cfg = spec.model_config(mixer_name, n)
        rng = np.random.default_rng(seed)
        dtype = np.dtype(cfg.dtype)
        x = rng.standard_normal((spec.batch_size, n, cfg.d_model)).astype(dtype)    # (B, N, D)
        dy = rng.standard_normal(x.shape).astype(dtype)                              # (B, N, D)
        mixer, p = _layer(mixer_name, cfg, x, rng)
        _step(mixer, x, p, cfg, dy)                                   # warm-up: kernels loaded
        times, cpu = [], []
        while len(times) < spec.steps or sum(cpu) < MIN_TIMED_S:
            t0, c0 = time.perf_counter(), time.process_time()
            _step(mixer, x, p, cfg, dy)
            cpu.append(time.process_time() - c0)
            times.append(time.perf_counter() - t0)
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            result = _step(mixer, x, p, cfg, dy)
            peak = tracemalloc.get_traced_memory()[1] - before
            del result
        finally:
            if not was_tracing:
                tracemalloc.stop()
        out["lengths"].append(n)
        out["cpu_s"].append(min(cpu))
        out["time_s"].append(min(times))
        out["median_s"].append(statistics.median(times))
        out["memory_b"].append(int(peak))
    out["dtype"] = spec.model.get("dtype", "float32")
    out["threads"] = numba.get_num_threads()
    return out


def fit_slope(lengths, values, fit_from=0):
    """(slope, intercept) of the least-squares line log(values) = slope log(N) + intercept
    over the N >= fit_from; nan if fewer than two positive points remain."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(lengths, values)
           if n >= fit_from and v is not None and v > 0]
    if len(pts) < 2:
        return float("nan"), float("nan")
    xs, ys = np.array(pts).T
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope), float(intercept)


def slopes(result, fit_from=0):
    """{"time": slope of the CPU time, "memory": slope} of one mixer's measurement."""
    return {"time": fit_slope(result["lengths"], result["cpu_s"], fit_from)[0],
            "memory": fit_slope(result["lengths"], result["memory_b"], fit_from)[0]}
