"""enwik8: the first 10^8 bytes of an English Wikipedia XML dump (the Hutter Prize file).

The standard split (used since Graves 2013 and by Transformer-XL) is by position:
the first 90,000,000 bytes are training, the next 5,000,000 validation, the last
5,000,000 test. The file is memory-mapped read-only and modelled as raw bytes
(no UTF-8 check: the split points may fall inside a character, as they do in the
standard split). The split sizes are parameters so that the tests can use a small
file with the same rule; the file must have exactly their sum.
"""

import os

from gma_np.data.corpus import ByteCorpus, DataError, map_bytes

NAME = "enwik8"
TRAIN_BYTES, VALID_BYTES, TEST_BYTES = 90_000_000, 5_000_000, 5_000_000

# The first bytes of a zip archive: the download is enwik8.zip, a frequent mistake.
ZIP_MAGIC = b"PK\x03\x04"


def load(path, train_bytes=TRAIN_BYTES, valid_bytes=VALID_BYTES, test_bytes=TEST_BYTES):
    """The ByteCorpus of the enwik8 file `path` (or of a directory holding `enwik8`)."""
    for name, value in (("train_bytes", train_bytes), ("valid_bytes", valid_bytes),
                        ("test_bytes", test_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path string, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "enwik8")
    data = map_bytes(path, "the enwik8 file")
    expected = train_bytes + valid_bytes + test_bytes
    if bytes(data[:4]) == ZIP_MAGIC:
        raise DataError(f"data: expected the unzipped enwik8 file at {path!r}, found a zip "
                        f"archive (unzip it first)")
    if len(data) != expected:
        raise DataError(f"data: expected the enwik8 file at {path!r} to have {expected} bytes "
                        f"({train_bytes} + {valid_bytes} + {test_bytes}), found {len(data)}")
    v0, t0 = train_bytes, train_bytes + valid_bytes
    return ByteCorpus(name=f"enwik8 ({train_bytes:,} / {valid_bytes:,} / {test_bytes:,} bytes)",
                      train=data[:v0], val=data[v0:t0], test=data[t0:])
