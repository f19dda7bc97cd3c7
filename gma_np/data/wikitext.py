"""WikiText-103 (or -2) from a directory the user already has.

The standard release holds three files per variant:

    wiki.train.tokens  wiki.valid.tokens  wiki.test.tokens     (tokenised, <unk> for rare words)
    wiki.train.raw     wiki.valid.raw     wiki.test.raw        (the raw character-level text)

Their files are the splits (train, val, test), each memory-mapped read-only and
modelled as UTF-8 bytes, so bits per byte are per byte of the file. `variant`
"auto" takes the .tokens files when the train and valid ones are there, else the
.raw ones. The test file is optional (a directory without it has no test split);
train and valid are required.
"""

import os

from gma_np.data.corpus import ByteCorpus, DataError, check_utf8, map_bytes

NAME = "wikitext"
VARIANTS = ("tokens", "raw")


def split_paths(directory, variant):
    """{split: path} of the standard files of `variant` in `directory` (existing or not)."""
    return {split: os.path.join(directory, f"wiki.{stem}.{variant}")
            for split, stem in (("train", "train"), ("val", "valid"), ("test", "test"))}


def find_variant(directory):
    """The first variant whose train and valid files are both in `directory`, or None."""
    for variant in VARIANTS:
        paths = split_paths(directory, variant)
        if os.path.isfile(paths["train"]) and os.path.isfile(paths["val"]):
            return variant
    return None


def load(path, variant="auto", check_encoding=True):
    """The ByteCorpus of the WikiText directory `path` (or of the directory of one of its files)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path string, got {type(path).__name__} {path!r}")
    directory = os.fspath(path)
    if os.path.isfile(directory):
        directory = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(directory):
        raise DataError(f"data: expected a WikiText directory at {directory!r}, found nothing there")
    if variant == "auto":
        variant = find_variant(directory)
        if variant is None:
            raise DataError(f"data: expected wiki.train.tokens and wiki.valid.tokens (or the .raw "
                            f"pair) in {directory!r}, found {sorted(os.listdir(directory))[:8]}")
    elif variant not in VARIANTS:
        raise ValueError(f"variant: expected 'auto', 'tokens' or 'raw', got {variant!r}")
    paths = split_paths(directory, variant)
    splits = {}
    for split, file in paths.items():
        if split == "test" and not os.path.exists(file):
            splits[split] = None
            continue
        what = f"the WikiText {split} file wiki.*.{variant}"
        splits[split] = map_bytes(file, what)
        if check_encoding:
            check_utf8(file, what)
    return ByteCorpus(name=f"WikiText ({os.path.basename(directory.rstrip(os.sep)) or directory}, "
                           f".{variant})", **splits)
