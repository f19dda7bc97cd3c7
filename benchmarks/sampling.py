"""Decoding speed: gma_step alone and the tiny model's sampling, in tokens/s, against position.

    python benchmarks/sampling.py [--positions 0 1000 10000] [--window 200] [--repeats 5]
                                  [--dtype float64] [--tokens 2000]
                                  [--model-positions 100 4000] [--model-window 64]

1. gma_step at B=1, H=4, d=e=K=64 (random inputs and mixture, --dtype): one sequence
   is stepped from the empty state to the last position (after one untimed step that
   prepares the mixture), and the `window` tokens from each position on are timed; tokens/s at each position is the median over repeats.
   Flat means a ratio last / first position near 1.
2. `gma-np sample`'s loop on the tiny preset's model (random weights: the cost does not
   depend on them): gma_np.train.evaluate.generate of `--tokens` bytes after a one-token
   warm-up (Numba loads its kernels then, as in `gma-np sample`); tokens/s per repeat,
   and the median.
3. The tiny model's decode per token at `--model-positions` (median over `--model-window`
   tokens), twice: with a positional table of 4100 rows, so that position 4000 is a real
   learned position, and with the trained preset's 128 rows, past which positions are
   clamped to the last row (docs/training.md).

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
from gma_np.nn import LanguageModel
from gma_np.train.config import preset
from gma_np.train.data import default_text
from gma_np.train.evaluate import _pick, generate

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


def sample_rate(model, n_tokens, seed):
    """(wall, cpu) tokens/s of generate(model, "\\n", n_tokens) after a warm-up token."""
    generate(model, b"\n", 1, temperature=0)
    t0 = _clocks()
    generate(model, b"\n", n_tokens, rng=np.random.default_rng(seed))
    return n_tokens / (_clocks() - t0)


def decode_windows(model, positions, window, rng):
    """(wall, cpu) seconds per decoded token over `window` tokens from each position."""
    stream = np.frombuffer(default_text(), dtype=np.uint8)
    state = model.decode_init(1)
    token = int(stream[0])
    times = np.empty((max(positions) + window, 2))
    for t in range(len(times)):
        t0 = _clocks()
        logits, state = model.decode(np.array([[token]], dtype=np.int64), state)
        token = _pick(logits[0, -1].astype(np.float64), 1.0, 0, rng)
        times[t] = _clocks() - t0
    return np.array([np.median(times[p:p + window], axis=0) for p in positions])


def _row(label, wall, cpu, unit):
    return f"  {label:>10}  {wall:>12,.1f}  {cpu:>12,.1f}  {unit}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[0, 1000, 10000])
    parser.add_argument("--window", type=int, default=200, help="gma_step tokens timed at each position")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens sampled per repeat")
    parser.add_argument("--model-positions", type=int, nargs="+", default=[100, 4000])
    parser.add_argument("--model-window", type=int, default=64)
    args = parser.parse_args()
    blas_threads(1)                                 # for the rest of the process, as gma-np sample
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    header = f"  {'':>10}  {'wall':>12}  {'cpu':>12}"

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

    # 2. sampling on the tiny model
    model = LanguageModel(preset("tiny").model_config(), seed=0)
    rates = np.array([sample_rate(model, args.tokens, r) for r in range(args.repeats)])
    print(f"\ngma-np sample's loop, tiny model: {args.tokens} tokens after start-up, tokens/s "
          f"(repeats: " + ", ".join(f"{w:,.0f}" for w in rates[:, 0]) + " wall)")
    print(header)
    print(_row("median", *np.median(rates, axis=0), "tokens/s"))

    # 3. the model's decode against position
    for label, max_len in (("positional table of 4100 rows", 4100),
                           ("trained table of 128 rows, clamped", 128)):
        cfg = preset("tiny", context=max_len).model_config()
        model = LanguageModel(cfg, seed=0)
        med = np.median([decode_windows(model, args.model_positions, args.model_window,
                                        np.random.default_rng(r))
                         for r in range(args.repeats)], axis=0)          # (P, 2) seconds
        print(f"\ndecode of one token, tiny model, {label}: us per token "
              f"(median of {args.repeats}, {args.model_window} tokens each)")
        print(header)
        for p, (wall, cpu) in zip(args.model_positions, med):
            print(_row(f"{p}", 1e6 * wall, 1e6 * cpu, "us"))
        ratio = med[-1] / med[0]
        print(f"  ratio position {args.model_positions[-1]} / {args.model_positions[0]}: "
              f"{ratio[0]:.3f} wall, {ratio[1]:.3f} cpu")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
