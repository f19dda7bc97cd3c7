"""Multi-query associative recall (MQAR; Arora, Eyuboglu et al. 2023, "Zoology").

Dimension legend: B batch, N tokens per row (seq_len), P key-value pairs, V vocabulary.

A row is P key-value pairs, then a query region where every key is asked once, in
random order, among noise; the answer at a query is the value that followed that key:

    position   0   1   2   3  | 4   5   6   7   8   9  10  11
    token      k1  v1  k2  v2 | n   n   k2  n   n   n   k1  n        n = noise
    target                    |         v2              v1           loss only here

Keys are distinct, drawn from 1..V/2 - 1, values distinct from V/2..V - 1. The
queries sit at even offsets 2 g of the query region (g < S = (N - 2P) / 2), the g
drawn without replacement with probability proportional to g'^(a - 1), g' = g + 1
(a power law: with a = 0.01 most queries come soon after the pairs, a few far).
Every other position of the query region is noise drawn uniformly from the whole
vocabulary, as in Zoology (so a noise token may repeat a key: the task asks only
for the answer at the query positions). The model is causal and sees the query
token itself; the target at the query position is its value (next-token form).

A K-slot memory holds at most K things well: recall accuracy against P at fixed K is
what separates a fixed-size memory from attention's cache (docs/tasks.md).
"""

import numpy as np

from gma_np.nn.heads import TokenHead
from gma_np.tasks.base import TaskSpec, check_int, fill_params
from gma_np.tasks.synthetic import SyntheticTask, distinct_choice, weighted_distinct_choice

NAME = "recall"


class RecallTask(SyntheticTask):
    """MQAR with seq_len tokens, n_pairs pairs, vocabulary vocab_size, power law power_a."""

    name = NAME

    def __init__(self, seed=0, seq_len=64, n_pairs=8, vocab_size=256, power_a=0.01,
                 n_val=500, n_test=500):
        p = check_params(seq_len, n_pairs, vocab_size, power_a, n_val, n_test)
        self.seq_len, self.n_pairs, self.vocab_size = p["seq_len"], p["n_pairs"], p["vocab_size"]
        self.power_a = p["power_a"]
        self.space = (self.seq_len - 2 * self.n_pairs) // 2                       # S query slots
        g = np.arange(1, self.space + 1, dtype=np.float64)
        self.log_p = (self.power_a - 1.0) * np.log(g)                             # (S,) unnormalised
        super().__init__({"seq_len": self.seq_len, "n_pairs": self.n_pairs,
                          "vocab_size": self.vocab_size, "power_a": self.power_a},
                         seed, n_val, n_test)

    def generate(self, rng, batch_size):
        B, N, P, V = batch_size, self.seq_len, self.n_pairs, self.vocab_size
        half = V // 2
        keys = distinct_choice(rng, B, half - 1, P) + 1                          # (B, P) in 1..V/2-1
        values = distinct_choice(rng, B, V - half, P) + half                     # (B, P) in V/2..V-1
        gaps = weighted_distinct_choice(rng, B, self.log_p, P)                   # (B, P) query slots
        tokens = rng.integers(0, V, size=(B, N))                                 # noise everywhere
        tokens[:, 0:2 * P:2] = keys
        tokens[:, 1:2 * P:2] = values
        rows = np.arange(B)[:, None]
        query_pos = 2 * P + 2 * gaps                                             # (B, P)
        tokens[rows, query_pos] = keys
        targets = np.zeros((B, N), dtype=np.int64)
        targets[rows, query_pos] = values
        loss_mask = np.zeros((B, N), dtype=bool)
        loss_mask[rows, query_pos] = True
        return tokens.astype(np.int64), targets, loss_mask


    def baseline(self, split):
        # a reader that knows which values are in the row but not which key each follows
        return "a random value of the row's pairs (1 / n_pairs)", 1.0 / self.n_pairs


DEFAULTS = dict(seq_len=64, n_pairs=8, vocab_size=256, power_a=0.01, n_val=500, n_test=500)


def check_params(seq_len, n_pairs, vocab_size, power_a, n_val, n_test):
    """The parameters, checked (ValueError naming the first bad one), power_a as a float."""
    seq_len = check_int("seq_len", seq_len, 4)
    n_pairs = check_int("n_pairs", n_pairs, 1)
    vocab_size = check_int("vocab_size", vocab_size, 4)
    if seq_len % 2:
        raise ValueError(f"seq_len: expected an even number (queries sit at even offsets), "
                         f"got {seq_len}")
    if 4 * n_pairs > seq_len:
        raise ValueError(f"n_pairs: expected at most seq_len / 4 = {seq_len // 4} (the pairs "
                         f"and a query region at least as long), got {n_pairs}")
    if n_pairs > vocab_size // 2 - 1:
        raise ValueError(f"n_pairs: expected at most vocab_size / 2 - 1 = {vocab_size // 2 - 1} "
                         f"distinct keys, got {n_pairs}")
    if not isinstance(power_a, (int, float)) or isinstance(power_a, bool) or not power_a > 0:
        raise ValueError(f"power_a: expected a number > 0, got {power_a!r}")
    return dict(seq_len=seq_len, n_pairs=n_pairs, vocab_size=vocab_size, power_a=float(power_a),
                n_val=check_int("n_val", n_val, 1), n_test=check_int("n_test", n_test, 1))


def spec(seed=0, **params):
    """The TaskSpec of build(seed, **params), checked without drawing: vocabulary
    vocab_size, rows of seq_len tokens, causal, the token head."""
    given = fill_params(NAME, {"seed": seed, **DEFAULTS}, params)
    p = check_params(**{k: v for k, v in given.items() if k != "seed"})
    return TaskSpec(params={"seed": check_int("seed", seed, 0), **p}, vocab_size=p["vocab_size"],
                    seq_len=p["seq_len"], causal=True, head=TokenHead())


def build(seed=0, cache_dir=None, **params):
    """The recall task (RecallTask's parameters); its sets take milliseconds to draw, so
    cache_dir is not used."""
    return RecallTask(seed=seed, **params)


def answer(tokens, loss_mask, n_pairs):
    """The answers a perfect reader gives (B, N): at each query, the value after that key
    in the pairs. The tests check the generated targets against it."""
    out = np.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        table = {int(tokens[b, 2 * i]): int(tokens[b, 2 * i + 1]) for i in range(n_pairs)}
        for n in np.flatnonzero(loss_mask[b]):
            out[b, n] = table[int(tokens[b, n])]
    return out


TASK_CLASS = RecallTask
