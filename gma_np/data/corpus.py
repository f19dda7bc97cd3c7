"""What every byte corpus is: three splits of uint8 bytes, read without copying.

Dimension legend: T bytes of a split. A token is a byte (vocabulary 256).

`ByteCorpus` is the one shape a dataset module returns: a name for the log and the
train / validation / test splits as 1-D uint8 arrays. A split read from disk is a
read-only `np.memmap` view, so a 500 MB corpus costs address space, not 500 MB of
Python objects: a batch gathers its windows by fancy indexing, which reads only the
pages it touches. The helpers here are the checks every file corpus shares; each
raises `DataError` naming the path, what was expected and what was found.
"""

import codecs
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Bytes per read of the streaming UTF-8 check: the decoded text of one chunk (up to
# 4 bytes per character as a Python str) is the only memory the check needs.
UTF8_CHECK_CHUNK = 1 << 22

# The byte alphabet: every corpus is modelled over all 256 byte values.
BYTE_VOCAB = 256


class DataError(ValueError):
    """A data path or file that cannot be used, with what was expected."""


@dataclass
class ByteCorpus:
    """Splits of a byte corpus: train, val and (when the corpus has one) test.

    Each split is a 1-D uint8 array, a read-only np.memmap for corpora on disk."""
    name: str                          # what was loaded, for the log
    train: np.ndarray                  # (T_train,) uint8
    val: np.ndarray                    # (T_val,) uint8
    test: Optional[np.ndarray] = None  # (T_test,) uint8, or None
    vocab_size: int = BYTE_VOCAB

    SPLITS = ("train", "val", "test")

    def split(self, name):
        """The split called `name` ("train", "val" or "test")."""
        if name not in self.SPLITS:
            raise ValueError(f"split: expected one of {self.SPLITS}, got {name!r}")
        data = getattr(self, name)
        if data is None:
            raise DataError(f"split: {self.name} has no {name} split")
        return data

    def sizes(self):
        """{split: bytes} of the splits it has."""
        return {s: len(getattr(self, s)) for s in self.SPLITS if getattr(self, s) is not None}


def require_file(path, what):
    """Raise DataError unless `path` is an existing regular file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path string, got {type(path).__name__} {path!r}")
    if not os.path.exists(path):
        raise DataError(f"data: expected {what} at {os.fspath(path)!r}, found nothing there")
    if not os.path.isfile(path):
        raise DataError(f"data: expected {what} at {os.fspath(path)!r}, found a directory")


def read_error(path, err):
    """The DataError of an OSError (no permission, a device that fails) reading `path`."""
    return DataError(f"data: cannot read {os.fspath(path)!r} ({err.strerror or type(err).__name__})")


def map_bytes(path, what):
    """The whole file as a read-only uint8 memmap (T,); DataError if missing, empty or
    unreadable. (The map keeps its own handle on the file: closing ours is fine.)"""
    require_file(path, what)
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"data: expected {what} at {os.fspath(path)!r}, found an empty file")
    try:
        with open(path, "rb") as f:
            return np.memmap(f, dtype=np.uint8, mode="r", shape=(size,))
    except OSError as err:
        raise read_error(path, err) from None


def check_utf8(path, what):
    """Raise DataError unless the file decodes as UTF-8, naming the first bad byte.

    Streams the file in UTF8_CHECK_CHUNK pieces through an incremental decoder, so a
    character split across two pieces is decoded whole and memory stays bounded."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        f = open(path, "rb")
    except OSError as err:
        raise read_error(path, err) from None
    with f:
        while True:
            try:
                chunk = f.read(UTF8_CHECK_CHUNK)
            except OSError as err:
                raise read_error(path, err) from None
            carried = len(decoder.getstate()[0])        # bytes of a character begun before
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise DataError(f"data: expected {what} in UTF-8 at {os.fspath(path)!r}, found "
                                f"invalid UTF-8 at byte {offset - carried + err.start}") from None
            if not chunk:
                return
            offset += len(chunk)


def split_tail(data, val_fraction, name):
    """(train, val): the last round(T * val_fraction) bytes of `data` are validation."""
    if not isinstance(val_fraction, (float, int)) or isinstance(val_fraction, bool) \
            or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    n_val = int(round(len(data) * val_fraction))
    if n_val < 2 or len(data) - n_val < 2:
        raise DataError(f"data: {name} has {len(data)} bytes, too few to hold out "
                        f"val_fraction={val_fraction} for validation")
    return data[:len(data) - n_val], data[len(data) - n_val:]
