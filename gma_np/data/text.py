"""Any UTF-8 text file as a byte corpus, memory-mapped.

The file is checked to be UTF-8 (streamed, so its size does not matter), then mapped
read-only; the last `val_fraction` of its bytes is validation, the rest training,
as for the embedded corpus. There is no test split.
"""

import os

from gma_np.data.corpus import ByteCorpus, check_utf8, map_bytes, split_tail

NAME = "text"


def load(path, val_fraction=0.1, check_encoding=True):
    """The ByteCorpus of the UTF-8 file `path` (train and val are memmap views)."""
    data = map_bytes(path, "a UTF-8 text file")
    if check_encoding:
        check_utf8(path, "a text file")
    base = os.path.basename(os.fspath(path))
    train, val = split_tail(data, val_fraction, repr(os.fspath(path)))
    return ByteCorpus(name=f"{base} (UTF-8 text)", train=train, val=val)
