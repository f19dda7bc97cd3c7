"""Selective copying (Gu and Dao 2023, "Mamba", section 3.1): reproduce the tokens
scattered among noise, in order, after the marker.

Dimension legend: B batch, L region length, M tokens to copy, N = L + M tokens per row.

    position   0  1  2  3  4  5  6  7  | 8  9  10
    token      .  a  .  .  b  .  c  .  | >  >  >          . = noise (0), > = marker (1)
    target                             | a  b  c          loss only here

The M data tokens are drawn uniformly from 2..V - 1 (repeats allowed) at M distinct
positions of the region, uniformly; every other region position is the noise token.
After the region come M markers; the target at the j-th marker is the j-th data
token. The model is causal: at a marker it has read the whole region and the markers
before, so it must remember which tokens came, in which order, while ignoring the
noise between them (the positions vary, so a fixed shift cannot solve it).
"""

import numpy as np

from gma_np.nn.heads import TokenHead
from gma_np.tasks.base import TaskSpec, check_int, fill_params
from gma_np.tasks.synthetic import SyntheticTask, distinct_choice

NAME = "copying"
NOISE, MARKER, FIRST_DATA = 0, 1, 2


class CopyingTask(SyntheticTask):
    """Selective copying of n_tokens tokens hidden in a region of region_len positions."""

    name = NAME

    def __init__(self, seed=0, region_len=64, n_tokens=8, vocab_size=16, n_val=500, n_test=500):
        p = check_params(region_len, n_tokens, vocab_size, n_val, n_test)
        self.region_len, self.n_tokens, self.vocab_size = p["region_len"], p["n_tokens"], p["vocab_size"]
        self.seq_len = self.region_len + self.n_tokens
        super().__init__({"region_len": self.region_len, "n_tokens": self.n_tokens,
                          "vocab_size": self.vocab_size}, seed, n_val, n_test)

    def generate(self, rng, batch_size):
        B, L, M, V = batch_size, self.region_len, self.n_tokens, self.vocab_size
        pos = np.sort(distinct_choice(rng, B, L, M), axis=1)                    # (B, M) in order
        data = rng.integers(FIRST_DATA, V, size=(B, M))                          # (B, M)
        tokens = np.full((B, L + M), NOISE, dtype=np.int64)
        tokens[np.arange(B)[:, None], pos] = data
        tokens[:, L:] = MARKER
        targets = np.zeros((B, L + M), dtype=np.int64)
        targets[:, L:] = data
        loss_mask = np.zeros((B, L + M), dtype=bool)
        loss_mask[:, L:] = True
        return tokens, targets, loss_mask


    def baseline(self, split):
        return "chance (1 / the data tokens)", 1.0 / (self.vocab_size - FIRST_DATA)


DEFAULTS = dict(region_len=64, n_tokens=8, vocab_size=16, n_val=500, n_test=500)


def check_params(region_len, n_tokens, vocab_size, n_val, n_test):
    """The parameters, checked (ValueError naming the first bad one)."""
    region_len = check_int("region_len", region_len, 1)
    return dict(region_len=region_len, n_tokens=check_int("n_tokens", n_tokens, 1, region_len),
                vocab_size=check_int("vocab_size", vocab_size, FIRST_DATA + 1),
                n_val=check_int("n_val", n_val, 1), n_test=check_int("n_test", n_test, 1))


def spec(seed=0, **params):
    """The TaskSpec of build(seed, **params), checked without drawing: vocabulary
    vocab_size, rows of region_len + n_tokens tokens, causal, the token head."""
    given = fill_params(NAME, {"seed": seed, **DEFAULTS}, params)
    p = check_params(**{k: v for k, v in given.items() if k != "seed"})
    return TaskSpec(params={"seed": check_int("seed", seed, 0), **p}, vocab_size=p["vocab_size"],
                    seq_len=p["region_len"] + p["n_tokens"], causal=True, head=TokenHead())


def build(seed=0, cache_dir=None, **params):
    """The copying task (CopyingTask's parameters); cache_dir is not used."""
    return CopyingTask(seed=seed, **params)


TASK_CLASS = CopyingTask
