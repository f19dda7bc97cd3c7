"""Byte corpora for language modelling, one module per dataset, and their registry.

    corpus.py    ByteCorpus (train / val / test uint8 splits), DataError, the shared checks
    embedded.py  pydoc_data.topics, shipped with Python (the default, no download)
    text.py      any UTF-8 text file (the last val_fraction is validation)
    wikitext.py  WikiText-103 / -2: wiki.{train,valid,test}.{tokens,raw} in a directory
    enwik8.py    enwik8: 90M / 5M / 5M bytes by position

Every module defines `NAME` and `load(**params) -> ByteCorpus`; corpora on disk are
memory-mapped (np.memmap), never read into Python objects. `get_dataset(name, **params)`
loads one by its registry name; `resolve(spec)` turns the trainer's `--data` string
("" or a path) into the right one.
"""

import inspect
import os

from gma_np._registry import registered_module
from gma_np.data.corpus import BYTE_VOCAB, ByteCorpus, DataError

# name -> module with NAME and load(**params). Imported on first use.
DATASETS = {
    "embedded": "gma_np.data.embedded",
    "text": "gma_np.data.text",
    "wikitext": "gma_np.data.wikitext",
    "enwik8": "gma_np.data.enwik8",
}

DATASET_NAMES = tuple(DATASETS)


def dataset_module(name):
    """The module of the registered dataset `name`; ValueError naming the known ones otherwise."""
    return registered_module(DATASETS, "dataset", name)


def get_dataset(name, **params):
    """The ByteCorpus of dataset `name` loaded with `params` (its module's `load` arguments)."""
    load = dataset_module(name).load
    accepted = tuple(inspect.signature(load).parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {name!r}: expected parameters among {accepted}, got {unknown}")
    return load(**params)


def resolve(spec, val_fraction=0.1):
    """The ByteCorpus a `--data` string names.

    ""                                  the embedded corpus
    a directory with wiki.train/valid   WikiText (.tokens preferred, else .raw)
    a wiki.*.tokens / wiki.*.raw file   WikiText of its directory
    a directory holding enwik8          enwik8
    a file named enwik8                 enwik8
    any other file                      a UTF-8 text file (val_fraction at its end)
    """
    name, params = spec_to_dataset(spec, val_fraction)
    return get_dataset(name, **params)


def spec_to_dataset(spec, val_fraction=0.1):
    """(dataset name, params) of a `--data` string (resolve's rule, without loading)."""
    from gma_np.data import wikitext

    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"data: expected a path string or '' for the embedded corpus, got {spec!r}")
    spec = os.fspath(spec)
    if spec == "":
        return "embedded", {"val_fraction": val_fraction}
    if not os.path.exists(spec):
        raise DataError(f"data: expected an existing file or directory at {spec!r}, not found")
    base = os.path.basename(os.path.normpath(spec))
    if os.path.isdir(spec):
        if wikitext.find_variant(spec) is not None:
            return "wikitext", {"path": spec}
        if os.path.isfile(os.path.join(spec, "enwik8")):
            return "enwik8", {"path": os.path.join(spec, "enwik8")}
        raise DataError(f"data: expected wiki.train.tokens + wiki.valid.tokens (or .raw) or an "
                        f"enwik8 file in the directory {spec!r}, found neither")
    if base.startswith("wiki.") and base.rsplit(".", 1)[-1] in wikitext.VARIANTS:
        return "wikitext", {"path": os.path.dirname(os.path.abspath(spec))}
    if base == "enwik8":
        return "enwik8", {"path": spec}
    return "text", {"path": spec, "val_fraction": val_fraction}


__all__ = ["DATASETS", "DATASET_NAMES", "ByteCorpus", "DataError", "BYTE_VOCAB",
           "dataset_module", "get_dataset", "resolve", "spec_to_dataset"]
