"""Byte-level language-modelling data for the trainer: the --data rule, batches, windows.

Dimension legend: B batch, N context (tokens per sequence). A token is a byte
(vocabulary 256), so bits per token are bits per byte.

The corpora are gma_np.data's registry (the embedded pydoc text, a UTF-8 file,
WikiText, enwik8, memory-mapped); `load_corpus(spec)` is its `--data` rule,
gma_np.data.resolve. The trainer reads them through the `lm` task
(gma_np.tasks.lm), whose batches are these:

- `sample_batch` draws B random windows of N + 1 bytes from a split with the run's
  numpy Generator (so the data order is part of the RNG state a checkpoint saves);
- `eval_batches` cuts a split into fixed non-overlapping windows: the same windows
  every time, no randomness.

They are kept here as the reference the task reproduces bit for bit
(tests/test_train.py::test_lm_task_batches_are_the_trainers).
"""

import numpy as np

from gma_np.data import ByteCorpus, DataError, resolve
from gma_np.data.embedded import default_text

__all__ = ["ByteCorpus", "DataError", "default_text", "load_corpus", "sample_batch", "eval_batches"]


def load_corpus(spec="", val_fraction=0.1):
    """The ByteCorpus named by `spec`: "" the embedded corpus, else a path
    (gma_np.data.resolve: a UTF-8 text file, a WikiText directory or file, enwik8)."""
    return resolve(spec, val_fraction)


def sample_batch(data, batch_size, context, rng):
    """B random windows of the split `data`: (idx, targets), both (B, N) int64, targets = idx shifted by one."""
    if len(data) < context + 2:
        raise DataError(f"data: a split of {len(data)} bytes is shorter than context + 1 = {context + 1}")
    starts = rng.integers(0, len(data) - context - 1, size=batch_size)     # (B,)
    window = data[starts[:, None] + np.arange(context + 1)].astype(np.int64)  # (B, N + 1)
    return window[:, :-1], window[:, 1:]


def eval_batches(data, context, batch_size, max_tokens=0):
    """Fixed validation windows (idx, targets), each (b, N), b <= B: non-overlapping, in order;
    with max_tokens > 0, that many tokens' worth of windows spread evenly over the split."""
    n_windows = (len(data) - 1) // context
    if n_windows < 1:
        raise DataError(f"data: a validation split of {len(data)} bytes is shorter than context + 1")
    starts = np.arange(n_windows) * context
    if max_tokens and max_tokens // context < n_windows:
        keep = max(1, max_tokens // context)
        starts = starts[np.linspace(0, n_windows - 1, keep).round().astype(np.int64)]
    for i in range(0, len(starts), batch_size):
        window = data[starts[i:i + batch_size, None] + np.arange(context + 1)].astype(np.int64)
        yield window[:, :-1], window[:, 1:]
