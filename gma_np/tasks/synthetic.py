"""What the generated token tasks (associative recall, selective copying) share.

Dimension legend: B batch, N tokens per row.

A synthetic task draws whole batches from a numpy Generator: `generate(rng, B)` ->
(tokens (B, N), targets (B, N), loss_mask (B, N)), the loss counted only where
loss_mask is True (the answers). The validation and test sets are fixed: drawn at
build time from Generators of (seed, split, task), with every repeat dropped and no
test row equal to a validation row. Training rows are drawn afresh for each batch
from the loop's Generator, and a row equal to a validation or test row is drawn again,
so the splits never share an example. (Within the endless training stream repeats are
possible but, at the sizes used, astronomically rare.)
"""

import zlib

import numpy as np

from gma_np.nn.heads import TokenHead
from gma_np.tasks.base import EVAL_BATCH, Batch, Task, accuracy, check_int, split_rng

# Batches drawn per missing row before the generator gives up (a parameter set with
# fewer distinct rows than n_val + n_test would otherwise loop forever).
MAX_DRAWS_PER_ROW = 100


def row_keys(tokens, loss_mask):
    """One bytes key per row: the tokens and where the answers are."""
    return [t.tobytes() + m.tobytes() for t, m in zip(tokens.astype(np.int32), loss_mask)]


class SyntheticTask(Task):
    """A causal token task with generated rows; the subclass defines generate(rng, B)."""

    causal = True
    metric_name = "answer_accuracy"
    higher_is_better = True

    def __init__(self, params, seed, n_val, n_test):
        self.params = {"seed": seed, **params}
        self.head = TokenHead()
        tag = zlib.crc32(self.name.encode())
        self.eval_sets, self._eval_keys = {}, set()
        for split, n in (("val", check_int("n_val", n_val, 1)), ("test", check_int("n_test", n_test, 1))):
            self.eval_sets[split] = self._distinct(split_rng(seed, split, tag), n)

    def generate(self, rng, batch_size):
        """(tokens (B, N) int64, targets (B, N) int64, loss_mask (B, N) bool)."""
        raise NotImplementedError

    def _metric(self, totals):
        return accuracy(totals)

    def summary(self):
        shown = ", ".join(f"{k} {v}" for k, v in self.params.items() if k not in ("n_val", "n_test"))
        return (f"{self.name} ({shown}): rows drawn afresh for training, "
                f"{len(self.eval_sets['val'][0]):,} val / {len(self.eval_sets['test'][0]):,} test")

    def _distinct(self, rng, n):
        """n rows none of which repeats another or is in self._eval_keys (then added there)."""
        parts, have, draws = [], 0, 0
        while have < n:
            draws += 1
            if draws > MAX_DRAWS_PER_ROW * n:
                raise ValueError(f"{self.name}: {draws - 1} batches gave only {have} distinct rows "
                                 f"(wanted {n}); the parameters allow too few different rows")
            tokens, targets, mask = self.generate(rng, n - have)
            keep = []
            for i, key in enumerate(row_keys(tokens, mask)):
                if key not in self._eval_keys:
                    self._eval_keys.add(key)
                    keep.append(i)
            parts.append((tokens[keep], targets[keep], mask[keep]))
            have += len(keep)
        return tuple(np.concatenate(a) for a in zip(*parts))

    def sample_batch(self, split, batch_size, rng):
        self._check_split(split)
        B = check_int("batch_size", batch_size, 1)
        if split != "train":
            rows = rng.integers(0, len(self.eval_sets[split][0]), size=B)
            return Batch(*(a[rows] for a in self.eval_sets[split][:2]), None, self.eval_sets[split][2][rows])
        tokens, targets, mask = self.generate(rng, B)
        while True:
            bad = [i for i, key in enumerate(row_keys(tokens, mask)) if key in self._eval_keys]
            if not bad:
                return Batch(tokens, targets, None, mask)
            tokens[bad], targets[bad], mask[bad] = self.generate(rng, len(bad))

    def eval_batches(self, split, batch_size=EVAL_BATCH, max_examples=0):
        self._check_split(split)
        if split == "train":
            raise ValueError(f"split: task {self.name!r} draws its training rows afresh; "
                             f"evaluate on 'val' or 'test'")
        tokens, targets, mask = self.eval_sets[split]
        n = min(len(tokens), max_examples) if max_examples else len(tokens)
        for i in range(0, n, check_int("batch_size", batch_size, 1)):
            j = min(n, i + batch_size)
            yield Batch(tokens[i:j], targets[i:j], None, mask[i:j])


def distinct_choice(rng, B, n_choices, k):
    """(B, k) int64: per row k distinct integers of range(n_choices), uniformly, in random order."""
    return np.argsort(rng.random((B, n_choices)), axis=1)[:, :k]


def weighted_distinct_choice(rng, B, log_p, k):
    """(B, k) int64: per row k distinct indices of log_p drawn one after another, each with
    probability proportional to exp(log_p) among those left (the Gumbel top-k trick:
    the k largest of log_p + Gumbel noise have that distribution)."""
    gumbel = -np.log(-np.log(rng.random((B, len(log_p)))))
    return np.argsort(-(log_p + gumbel), axis=1)[:, :k]
