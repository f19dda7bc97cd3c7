"""Decoding speed: gma_step alone, and the tiny model's sampling and decode against position,
the fused decode (gma_np.nn.decode) beside the reference (LanguageModel.decode), in tokens/s.

    python benchmarks/sampling.py [--positions 0 1000 10000] [--window 200] [--repeats 5]
                                  [--dtype float64] [--tokens 2000] [--mixers gma linear ...]
                                  [--model-positions 100 4000] [--model-window 64]

1. gma_step at B=1, H=4, d=e=K=64 (random inputs and mixture, --dtype): one sequence
   is stepped from the empty state to the last position (after one untimed step that
   prepares the mixture), and the `window` tokens from each position on are timed; tokens/s at each position is the median over repeats.
   Flat means a ratio last / first position near 1.
2. `gma-np sample`'s loop on the tiny preset's model of each of --mixers (random weights:
   the cost does not depend on them): `--tokens` bytes after a one-token warm-up (Numba
   loads its kernels then, as in `gma-np sample`), by gma_np.nn.decode.generate (what
   `gma-np sample` runs: "fused") and by gma_np.train.evaluate.generate (the reference
   decode: "reference"), the two interleaved in every repeat; tokens/s as medians over
   repeats, and whether the two wrote the same text.
3. The tiny GMA model's decode per token at `--model-positions` (median over `--model-window`
   tokens), fused and reference, twice: with a positional table of 4100 rows, so that
   position 4000 is a real learned position, and with the trained preset's 128 rows, past
   which positions are clamped to the last row (docs/training.md).

Every figure is given as wall time and as the CPU time of the process (time.process_time);
where tokens are timed one by one, also as the median token's wall time. On a shared
machine the wall time of a window also counts the waits for a core that other processes
hold, which the median token mostly escapes; the CPU time is what the code costs. The script prints the load average it ran under.
BLAS runs on one thread, as in `gma-np sample`.
"""

import argparse
import os
import time

import numpy as np

import gma_np
from gma_np._threads import blas_threads
from gma_np.mixers import MIXER_NAMES
from gma_np.nn import LanguageModel
from gma_np.nn.decode import FastDecoder, pick_token
from gma_np.nn.decode import generate as fused_generate
from gma_np.train.config import preset
from gma_np.train.data import default_text
from gma_np.train.evaluate import generate as reference_generate

B, H, D, E, K = 1, 4, 64, 64, 64       # the gma_step problem of docs/performance.md


def _clocks():
    return np.array([time.perf_counter(), time.process_time()])


def gma_step_windows(positions, window, dtype, rng):
    """Seconds per token over `window` tokens from each position, (P, 3): the median
    of the tokens' wall times, their mean wall time, their mean CPU time."""
    last = max(positions) + window
    q, k = (rng.standard_normal((last, B, H, D)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((last, B, H, E)).astype(dtype)
    mix = dict(means=rng.standard_normal((H, K, D)), log_var=0.3 * rng.standard_normal((H, K, D)),
               logits=0.5 * rng.standard_normal((H, K)))
    gma_np.gma_step(q[0], k[0], v[0], **mix)        # the mixture's one-time preparation
    wall = np.empty(last)
    cpu = np.zeros(len(positions))
    windows = [(p, p + window) for p in positions]
    state = None
    for t in range(last):
        for i, (lo, hi) in enumerate(windows):
            if t == lo:
                cpu[i] -= time.process_time()
        t0 = time.perf_counter()
        _, state = gma_np.gma_step(q[t], k[t], v[t], **mix, state=state)
        wall[t] = time.perf_counter() - t0
        for i, (lo, hi) in enumerate(windows):
            if t == hi - 1:
                cpu[i] += time.process_time()
    return np.array([[np.median(wall[lo:hi]), wall[lo:hi].mean(), cpu[i] / window]
                     for i, (lo, hi) in enumerate(windows)])


def sample_rate(generate, model, n_tokens, seed):
    """((wall, cpu) tokens/s, text) of generate(model, "\\n", n_tokens) after a warm-up token."""
    generate(model, b"\n", 1, temperature=0)
    t0 = _clocks()
    text = generate(model, b"\n", n_tokens, rng=np.random.default_rng(seed))
    return n_tokens / (_clocks() - t0), text


class _Reference:
    """LanguageModel.decode behind FastDecoder's methods, to time both the same way."""

    def __init__(self, model):
        self.model, self.state = model, model.decode_init(1)

    def decode(self, tokens):
        logits, self.state = self.model.decode(tokens, self.state)
        return logits


def decode_windows(decoder, positions, window, rng):
    """(wall, cpu) seconds per decoded token over `window` tokens from each position."""
    stream = np.frombuffer(default_text(), dtype=np.uint8)
    token = int(stream[0])
    times = np.empty((max(positions) + window, 2))
    for t in range(len(times)):
        t0 = _clocks()
        logits = decoder.decode(np.array([[token]], dtype=np.int64))
        token = pick_token(logits[0, -1].astype(np.float64), 1.0, 0, rng)
        times[t] = _clocks() - t0
    return np.array([np.median(times[p:p + window], axis=0) for p in positions])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[0, 1000, 10000])
    parser.add_argument("--window", type=int, default=200, help="gma_step tokens timed at each position")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens sampled per repeat")
    parser.add_argument("--mixers", nargs="+", choices=MIXER_NAMES, default=list(MIXER_NAMES))
    parser.add_argument("--model-positions", type=int, nargs="+", default=[100, 4000])
    parser.add_argument("--model-window", type=int, default=64)
    args = parser.parse_args()
    blas_threads(1)                                 # for the rest of the process, as gma-np sample
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")

    # 1. gma_step
    gma_step_windows([0], 2, args.dtype, np.random.default_rng(0))        # compile or load
    per_token = np.median([gma_step_windows(args.positions, args.window, args.dtype,
                                            np.random.default_rng(r))
                           for r in range(args.repeats)], axis=0)         # (P, 3) seconds
    print(f"\ngma_step, B={B} H={H} d=e=K={D}, {args.dtype}: tokens/s from position "
          f"(median of {args.repeats}, {args.window} tokens each; 'token' is the median "
          f"token's wall time, 'wall' and 'cpu' the window's)")
    print(f"  {'':>10}  {'token':>12}  {'wall':>12}  {'cpu':>12}")
    for p, times in zip(args.positions, per_token):
        print(f"  {p:>10}  " + "  ".join(f"{1 / t:>12,.0f}" for t in times)
              + "  tokens/s  (" + ", ".join(f"{1e6 * t:.1f}" for t in times) + " us)")
    ratio = per_token[-1] / per_token[0]
    print(f"  time per token at position {args.positions[-1]} / at {args.positions[0]}: "
          + ", ".join(f"{r:.3f} {n}" for r, n in zip(ratio, ("token", "wall", "cpu"))))

    # 2. sampling on the tiny model of every mixer, fused and reference interleaved
    print(f"\n`gma-np sample`'s loop, tiny model: {args.tokens} tokens after start-up, tokens/s "
          f"(median of {args.repeats}; fused = gma_np.nn.decode, reference = LanguageModel.decode)")
    print(f"  {'mixer':>10}  {'fused wall':>12}  {'fused cpu':>12}  {'ref wall':>12}  {'ref cpu':>12}"
          f"  {'cpu ratio':>9}  same text")
    for mixer in args.mixers:
        model = LanguageModel(preset("tiny", mixer=mixer).model_config(), seed=0)
        rates = {"fused": [], "reference": []}
        same = True
        for r in range(args.repeats):
            fast, text = sample_rate(fused_generate, model, args.tokens, r)
            ref, ref_text = sample_rate(reference_generate, model, args.tokens, r)
            rates["fused"].append(fast)
            rates["reference"].append(ref)
            same &= text == ref_text
        fast, ref = (np.median(rates[k], axis=0) for k in ("fused", "reference"))
        print(f"  {mixer:>10}  {fast[0]:>12,.0f}  {fast[1]:>12,.0f}  {ref[0]:>12,.0f}  {ref[1]:>12,.0f}"
              f"  {fast[1] / ref[1]:>9.2f}  {'yes' if same else 'NO'}")

    # 3. the GMA model's decode against position, fused and reference interleaved
    for label, max_len in (("positional table of 4100 rows", 4100),
                           ("trained table of 128 rows, clamped", 128)):
        cfg = preset("tiny", context=max_len).model_config()
        model = LanguageModel(cfg, seed=0)
        med = {"fused": [], "reference": []}
        for r in range(args.repeats):
            for kind, decoder in (("fused", FastDecoder(model)), ("reference", _Reference(model))):
                med[kind].append(decode_windows(decoder, args.model_positions, args.model_window,
                                                np.random.default_rng(r)))
        print(f"\ndecode of one token, tiny model, {label}: us per token "
              f"(median of {args.repeats}, {args.model_window} tokens each)")
        print(f"  {'':>10}  {'fused wall':>12}  {'fused cpu':>12}  {'ref wall':>12}  {'ref cpu':>12}")
        fused, ref = (np.median(med[k], axis=0) for k in ("fused", "reference"))   # (P, 2)
        for p, a, b in zip(args.model_positions, fused, ref):
            print(f"  {p:>10}  {1e6 * a[0]:>12,.1f}  {1e6 * a[1]:>12,.1f}  {1e6 * b[0]:>12,.1f}"
                  f"  {1e6 * b[1]:>12,.1f}  us")
        ratio = fused[-1] / fused[0]
        print(f"  fused, ratio position {args.model_positions[-1]} / {args.model_positions[0]}: "
              f"{ratio[0]:.3f} wall, {ratio[1]:.3f} cpu")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
