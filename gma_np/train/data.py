"""Byte-level language-modelling data: corpora, their train/validation splits, batches.

Dimension legend: B batch, N context (tokens per sequence). A token is a byte
(vocabulary 256), so bits per token are bits per byte.

Corpora (`load_corpus(spec)`):

- ""  (the default): Python's own documentation topics, `pydoc_data.topics`,
  which every CPython ships (about 466 KB of English): no download. The topics
  are joined in sorted order; the last `val_fraction` of the bytes is validation.
- a UTF-8 text file: the same split, at the end of the file.
- WikiText-103 (or -2) that a user already has: a directory holding
  `wiki.train.tokens` and `wiki.valid.tokens` (or the `.raw` pair), or the path
  of one of those files; the standard train and valid files are the splits.
- enwik8: a file named `enwik8` (100,000,000 bytes); the standard split is the
  first 90 M bytes for training, the next 5 M for validation (the last 5 M are test).

Batches: `sample_batch` draws B random windows of N + 1 bytes from the train
split with the run's numpy Generator (so the data order is part of the RNG
state a checkpoint saves). `eval_batches` cuts the validation split into fixed
non-overlapping windows: the same windows every time, no randomness.
"""

import os
from dataclasses import dataclass

import numpy as np

ENWIK8_SIZE = 100_000_000
ENWIK8_TRAIN, ENWIK8_VALID = 90_000_000, 5_000_000


class DataError(ValueError):
    """A data path or file that cannot be used, with what was expected."""


@dataclass
class Corpus:
    name: str               # what was loaded, for the log
    train: np.ndarray       # (T_train,) uint8
    val: np.ndarray         # (T_val,) uint8


def default_text():
    """The embedded corpus: every pydoc topic, in sorted order, as UTF-8 bytes."""
    from pydoc_data import topics
    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")


def _split(data, val_fraction, name):
    n_val = int(round(len(data) * val_fraction))
    if n_val < 2 or len(data) - n_val < 2:
        raise DataError(f"data: {name} has {len(data)} byte{'s' * (len(data) != 1)}, too few to hold out "
                        f"val_fraction={val_fraction} for validation")
    arr = np.frombuffer(data, dtype=np.uint8)
    return Corpus(name=name, train=arr[:-n_val], val=arr[-n_val:])


def _read(path, read):
    """read(path), with an OSError (permission, a device that fails) as a DataError naming the path."""
    try:
        return read(path)
    except OSError as err:
        raise DataError(f"data: cannot read {path!r} ({err.strerror or type(err).__name__})") from None


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _read_utf8(path):
    data = _read(path, _read_bytes)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data: expected a UTF-8 text file, {path!r} has invalid UTF-8 "
                        f"at byte {err.start}") from None
    return data


def _wikitext_pair(directory):
    for ext in ("tokens", "raw"):
        train = os.path.join(directory, f"wiki.train.{ext}")
        valid = os.path.join(directory, f"wiki.valid.{ext}")
        if os.path.isfile(train) and os.path.isfile(valid):
            return train, valid
    return None


def load_corpus(spec="", val_fraction=0.1):
    """The Corpus named by `spec` (see the module docstring)."""
    if not isinstance(spec, str):
        raise TypeError(f"data: expected a path string or '' for the default corpus, got {spec!r}")
    if spec == "":
        return _split(default_text(), val_fraction, "pydoc_data.topics (embedded)")
    if not os.path.exists(spec):
        raise DataError(f"data: expected an existing file or directory, got {spec!r} (not found)")
    base = os.path.basename(os.path.normpath(spec))
    if os.path.isdir(spec):
        pair = _wikitext_pair(spec)
        if pair is None and os.path.isfile(os.path.join(spec, "enwik8")):
            return load_corpus(os.path.join(spec, "enwik8"))
        if pair is None:
            raise DataError(f"data: directory {spec!r} holds neither wiki.train.tokens + "
                            f"wiki.valid.tokens (or .raw) nor enwik8")
        train, valid = pair
        return Corpus(name=f"WikiText ({os.path.basename(train)}, {os.path.basename(valid)})",
                      train=np.frombuffer(_read_utf8(train), dtype=np.uint8),
                      val=np.frombuffer(_read_utf8(valid), dtype=np.uint8))
    if base.startswith("wiki.") and base.split(".")[-1] in ("tokens", "raw"):
        pair = _wikitext_pair(os.path.dirname(os.path.abspath(spec)))
        if pair is None:
            raise DataError(f"data: {spec!r} looks like WikiText, but wiki.train and wiki.valid "
                            f"are not both beside it")
        return load_corpus(os.path.dirname(os.path.abspath(spec)))
    if base == "enwik8":
        size = os.path.getsize(spec)
        if size != ENWIK8_SIZE:
            raise DataError(f"data: enwik8 should have {ENWIK8_SIZE} bytes, {spec!r} has {size}")
        arr = _read(spec, lambda p: np.fromfile(p, dtype=np.uint8))
        return Corpus(name="enwik8 (90M train / 5M valid)", train=arr[:ENWIK8_TRAIN],
                      val=arr[ENWIK8_TRAIN:ENWIK8_TRAIN + ENWIK8_VALID])
    return _split(_read_utf8(spec), val_fraction, base)


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
