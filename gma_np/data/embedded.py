"""The embedded corpus: Python's own documentation topics, no download needed.

`pydoc_data.topics` ships with every CPython (about 466 KB of English). The topics
are joined in sorted key order with blank lines between them, encoded as UTF-8; the
last `val_fraction` of the bytes is validation. There is no test split. This is the
trainer's default corpus, byte for byte the text gma_np.train.data has always used,
so validation figures stay comparable.
"""

import numpy as np

from gma_np.data.corpus import ByteCorpus, split_tail

NAME = "embedded"


def default_text():
    """Every pydoc topic, in sorted order, as UTF-8 bytes."""
    from pydoc_data import topics
    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")


def load(val_fraction=0.1):
    """The embedded ByteCorpus: train and val (in memory; it is small)."""
    data = np.frombuffer(default_text(), dtype=np.uint8)
    train, val = split_tail(data, val_fraction, "pydoc_data.topics")
    return ByteCorpus(name="pydoc_data.topics (embedded)", train=train, val=val)
