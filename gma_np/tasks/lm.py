"""Next-byte language modelling on a byte corpus: causal body, token head, bits per byte.

Dimension legend: B batch, N context (tokens per row). A token is a byte (vocabulary
256), so bits per token are bits per byte.

The corpus is any gma_np.data dataset: the embedded pydoc text by default, a UTF-8
file, WikiText-103 or enwik8 (memory-mapped). Training rows are B random windows of
N + 1 bytes of the train split, drawn with the loop's Generator (so the data order is
part of the RNG state a checkpoint saves): tokens = window[:-1], targets = window[1:].
Evaluation rows are fixed non-overlapping windows of the split, in order, or
`max_examples` of them spread evenly over it: the same windows every time. Every
window starts from an empty memory, as in training.
"""

import numpy as np

from gma_np.data import BYTE_VOCAB, DATASET_NAMES, DataError, get_dataset, resolve
from gma_np.nn.heads import TokenHead
from gma_np.tasks.base import EVAL_BATCH, Batch, Task, TaskSpec, bits_per_token, check_int, fill_params

NAME = "lm"


class LMTask(Task):
    """Byte-level language modelling on one ByteCorpus."""

    name = NAME
    causal = True
    metric_name = "bits_per_byte"
    log_name = "bpb"             # "val_bpb" in the run log, as the trainer has always written
    higher_is_better = False

    def __init__(self, corpus, context, seed=0, source=None):
        self.corpus = corpus
        self.context = check_int("context", context, 1)
        self.seq_len = self.context
        self.vocab_size = corpus.vocab_size
        self.head = TokenHead()
        self.splits = tuple(corpus.sizes())
        self.params = {"seed": seed, "context": self.context, **(source or {})}
        for split, size in corpus.sizes().items():
            if size < self.context + 2:
                raise DataError(f"data: the {split} split of {corpus.name} has {size} bytes, "
                                f"fewer than context + 2 = {self.context + 2}")

    def _metric(self, totals):
        return bits_per_token(totals)

    def summary(self):
        sizes = self.corpus.sizes()
        return (f"{self.corpus.name}: {sizes['train']:,} train / {sizes['val']:,} validation "
                f"bytes")

    def _windows(self, data, starts):
        window = data[starts[:, None] + np.arange(self.context + 1)].astype(np.int64)   # (B, N + 1)
        return Batch(window[:, :-1], window[:, 1:], None, None)

    def sample_batch(self, split, batch_size, rng):
        self._check_split(split)
        data = self.corpus.split(split)
        # high = len - N - 1 (not len - N): the draws of gma_np.train.data.sample_batch, so a
        # run on this task sees the batches the trainer has always drawn from the same seed
        starts = rng.integers(0, len(data) - self.context - 1,
                              size=check_int("batch_size", batch_size, 1))          # (B,)
        return self._windows(data, starts)

    def eval_batches(self, split, batch_size=EVAL_BATCH, max_examples=0):
        self._check_split(split)
        data = self.corpus.split(split)
        n_windows = (len(data) - 1) // self.context
        starts = np.arange(n_windows) * self.context
        if max_examples and max_examples < n_windows:
            starts = starts[np.linspace(0, n_windows - 1, max_examples).round().astype(np.int64)]
        for i in range(0, len(starts), check_int("batch_size", batch_size, 1)):
            yield self._windows(data, starts[i:i + batch_size])


DEFAULTS = dict(data="", context=128, val_fraction=0.1, dataset=None, dataset_params=None)


def spec(seed=0, **params):
    """The TaskSpec of build(**params), checked without reading the corpus: byte
    vocabulary, rows of `context` tokens, causal, the token head. dataset_params comes
    back as a dict ({} when not given). The seed is not used (nothing is drawn at build)."""
    p = fill_params(NAME, DEFAULTS, params)
    check_int("context", p["context"], 1)
    if not isinstance(p["data"], str):
        raise ValueError(f"data: expected a path string or '' for the embedded corpus, got {p['data']!r}")
    vf = p["val_fraction"]
    if not isinstance(vf, (int, float)) or isinstance(vf, bool) or not 0.0 < vf < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {vf!r}")
    if p["dataset"] is not None:
        if p["dataset"] not in DATASET_NAMES:
            raise ValueError(f"dataset: expected one of {DATASET_NAMES} or None, got {p['dataset']!r}")
        if p["data"] != "":
            raise ValueError(f"dataset: give the corpus either as data (a path, {p['data']!r}) "
                             f"or as dataset ({p['dataset']!r}), not both")
    if p["dataset_params"] is None:
        p["dataset_params"] = {}
    if not isinstance(p["dataset_params"], dict):
        raise ValueError(f"dataset_params: expected a dict of the dataset's load parameters, "
                         f"got {p['dataset_params']!r}")
    if p["dataset_params"] and p["dataset"] is None:
        raise ValueError("dataset_params: given without a dataset")
    p["val_fraction"] = float(vf)
    return TaskSpec(params=p, vocab_size=BYTE_VOCAB, seq_len=p["context"], causal=True,
                    head=TokenHead())


def build(seed=0, cache_dir=None, data="", context=128, val_fraction=0.1, dataset=None,
          dataset_params=None):
    """The LM task on the corpus `data` names (a --data string: "" or a path, see
    gma_np.data.resolve), or on the registered `dataset` loaded with dataset_params.
    Nothing is generated, so cache_dir is not used."""
    spec(data=data, context=context, val_fraction=val_fraction, dataset=dataset,
         dataset_params=dataset_params)
    if dataset is None:
        corpus = resolve(data, val_fraction)
        source = {"data": data, "val_fraction": val_fraction}
    else:
        corpus = get_dataset(dataset, **(dataset_params or {}))
        source = {"dataset": dataset, "dataset_params": dict(dataset_params or {})}
    return LMTask(corpus, context, seed, source)


TASK_CLASS = LMTask
