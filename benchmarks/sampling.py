"""Sampling cost per token against position: the recurrent decode path is flat.

    python benchmarks/sampling.py [--positions 100 4000] [--window 64] [--repeats 3]

Builds the `tiny` preset's model (random weights: the cost does not depend on
them) twice: once with a positional table of 4100 rows, so that position 4000
is a real learned position, and once with the trained preset's 128 rows, so
that positions past 127 are clamped to the last row (docs/training.md). For
each, it decodes 4100 + window bytes one at a time (model.decode on one token,
then drawing the next byte from the logits, as `gma-np sample` does), timing
every token. Reported: the median per-token time over `window` tokens starting
at each position, the median over repeats, and the ratio of the last position
to the first. Flat means a ratio near 1 (within 1.2).

Timings on a shared machine are noisy: the ratio is computed within one run,
from medians, and the script prints the load average it ran under.
"""

import argparse
import os
import time

import numpy as np

from gma_np._threads import blas_threads
from gma_np.nn import LanguageModel
from gma_np.train.config import preset
from gma_np.train.data import default_text
from gma_np.train.evaluate import _pick


def per_token_times(model, n_tokens, rng):
    """Wall time (s) of each of n_tokens decode steps from an empty state."""
    stream = np.frombuffer(default_text(), dtype=np.uint8)
    state = model.decode_init(1)
    token = int(stream[0])
    times = np.empty(n_tokens)
    for t in range(n_tokens):
        t0 = time.perf_counter()
        logits, state = model.decode(np.array([[token]], dtype=np.int64), state)
        token = _pick(logits[0, -1].astype(np.float64), 1.0, 0, rng)
        times[t] = time.perf_counter() - t0
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[100, 4000])
    parser.add_argument("--window", type=int, default=64, help="tokens timed at each position")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    blas_threads(1)                                 # for the rest of the process
    last = max(args.positions) + args.window
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    for label, max_len in (("positional table of 4100 rows", 4100),
                           ("trained table of 128 rows, clamped", 128)):
        cfg = preset("tiny", context=max_len).model_config()
        model = LanguageModel(cfg, seed=0)
        per_repeat = []
        for r in range(args.repeats):
            times = per_token_times(model, last, np.random.default_rng(r))
            per_repeat.append([np.median(times[p:p + args.window]) for p in args.positions])
        med = np.median(np.array(per_repeat), axis=0)                # (positions,)
        print(f"\n{label} (d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
              f"K {cfg.n_components}, conv {cfg.conv_width}):")
        print(f"  {'position':>8}  {'ms/token (median)':>18}")
        for p, m in zip(args.positions, med):
            print(f"  {p:>8}  {1e3 * m:>18.3f}")
        print(f"  ratio position {args.positions[-1]} / position {args.positions[0]}: "
              f"{med[-1] / med[0]:.3f}  (repeats: "
              + ", ".join(f"{row[-1] / row[0]:.3f}" for row in per_repeat) + ")")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
