"""The task contract: everything the training loop knows of a task.

Dimension legend: B batch, N tokens, D model width, V vocabulary, C classes.

A task says what the batches are, which head turns the model body's hidden states
into a loss, what the metric is and how evaluation runs. The model body is shared by
every task: embeddings + blocks + final layernorm, h = body(tokens) (B, N, D), run
causally when `task.causal` and bidirectionally otherwise, with the batch's
key_mask (a causal-only mixer runs a bidirectional task causally where the task
allows it: `body_causal`). One training step is then

    batch = task.sample_batch("train", B, rng)                  # Batch (tokens, targets, key_mask, loss_mask)
    causal = body_causal(task, cfg.mixer)
    h, c_body = body_forward(params, batch.tokens, cfg, causal=causal, key_mask=batch.key_mask)
    loss, c_head, outputs = task.head_forward(h, params, batch, cfg)
    dh, g_head = task.head_backward(c_head)
    grads = add_head_grads(body_backward(dh, c_body), g_head)   # a shared name (tied wte) gets both

and evaluation is `task.evaluate(split, body, params, cfg)`, with body(tokens, key_mask)
-> h: the task runs its fixed evaluation batches through the body and its head and
returns the loss and the metric.

`params` is the model's one flat dict of arrays; it holds the head's own parameters
(head_shapes(cfg), made by init_head(cfg, rng)) beside the body's, and a head may
read a body parameter (the token head reads "wte" when embeddings are tied).

Before any data exists, a task module's `spec(**params)` says what the task is: its
parameters with the defaults filled in (checked, errors naming the parameter), the
vocabulary and longest row a model needs, whether the body runs causally, and the
head. The trainer's config validates itself with it without generating anything.
"""

import difflib
import math
import os
from typing import NamedTuple, Optional

import numpy as np

from gma_np.nn.heads import TokenHead, add_head_grads   # noqa: F401 (add_head_grads re-exported)

# Rows per evaluation batch when the caller does not say: bounds the activations' memory.
EVAL_BATCH = 64


class Batch(NamedTuple):
    """One batch. Unpacks as (tokens, targets, key_mask, loss_mask)."""
    tokens: np.ndarray                       # (B, N) int64 token ids
    targets: np.ndarray                      # (B, N) int64 next-token or answer ids; (B,) class labels
    key_mask: Optional[np.ndarray] = None    # (B, N) bool, True = a real token; None = no padding
    loss_mask: Optional[np.ndarray] = None   # (B, N) bool, True = a scored position; None = every one


class TaskSpec(NamedTuple):
    """What a task is before its data exists: enough to shape and check a model."""
    params: dict             # every parameter of the module's build, defaults filled in, checked
    vocab_size: int          # V: ModelConfig.vocab_size must equal it
    seq_len: int             # the longest row of any batch: ModelConfig.max_len must be >= it
    causal: bool             # the body runs causally (True) or bidirectionally with a key mask
    head: object             # the head (gma_np.nn.heads: TokenHead, PooledClassifierHead)
    causal_ok: bool = True   # a bidirectional task a causal-only mixer may run left to right


def body_causal(task, mixer):
    """Whether the body runs causally for `task` (a Task or a TaskSpec) under the mixer
    named `mixer`: a causal task's always does; a bidirectional task's does only under a
    causal-only mixer (mamba), and only when the task allows it (`causal_ok`: its pool
    reads every real token's state, and padding sits at the end of a row, so a token
    reads its real predecessors and nothing else). The config refuses the other case."""
    from gma_np.mixers import get_mixer
    return bool(task.causal or (task.causal_ok and get_mixer(mixer).causal_only))


def fill_params(task, defaults, given):
    """{**defaults, **given}; ValueError naming the first unknown parameter (with the
    closest known one) and listing the task's parameters."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{unknown[0]}: task {task!r} has no such parameter{hint}; its "
                         f"parameters are {', '.join(defaults)}")
    return {**defaults, **given}


# ---------------------------------------------------------------- metrics

def bits_per_token(totals):
    """Mean cross-entropy of the scored tokens in bits (bits per byte for a byte vocabulary)."""
    return totals["nats"] / totals["count"] / math.log(2.0)


def accuracy(totals):
    """Fraction of the scored targets (classes, or answer positions) predicted right."""
    return totals["correct"] / totals["count"]


# ---------------------------------------------------------------- the task

class Task:
    """A task: its data, head, metric and evaluation (module docstring: how the loop uses it).

    A subclass sets the attributes and implements sample_batch and eval_batches."""

    name = "task"
    causal = True            # run the body causally (LM, recall, copying) or bidirectionally (listops)
    causal_ok = True         # a bidirectional task whose head reads every real token's state
                             # (a mean pool), so a causal-only mixer may run it left to right
    vocab_size = 256         # V: ModelConfig.vocab_size must equal it
    seq_len = 128            # the longest row of any batch: ModelConfig.max_len must be >= it
    metric_name = "metric"   # what `metric` measures
    log_name = None          # the metric's key in the run log, "val_<log_name>" (None: metric_name)
    higher_is_better = True
    splits = ("train", "val", "test")
    head = TokenHead()
    params = {}              # the parameters it was built with (seed included), for the config

    def _metric(self, totals):
        raise NotImplementedError

    # ------------------------------------------------------------ data

    def sample_batch(self, split, batch_size, rng):
        """A random Batch of `batch_size` rows of `split`, drawn with the numpy Generator rng."""
        raise NotImplementedError

    def eval_batches(self, split, batch_size=EVAL_BATCH, max_examples=0):
        """The fixed Batches of `split` (the same every call, no randomness); with
        max_examples > 0 only that many rows in all."""
        raise NotImplementedError

    # ------------------------------------------------------------ head

    def head_shapes(self, cfg):
        """{name: shape} of the head's own parameters (they join the model's dict)."""
        return self.head.shapes(cfg)

    def init_head(self, cfg, rng):
        """{name: float64 array}: initial values of head_shapes(cfg)."""
        return self.head.init(cfg, rng)

    def head_forward(self, h, params, batch, cfg):
        """(loss in nats, cache, outputs) of the body's states h (B, N, D) on `batch`.

        outputs: {"nats": summed cross-entropy, "count": scored targets, "correct":
        argmax hits}, the sums `metric` is computed from (so batches add exactly)."""
        return self.head.forward(h, params, batch, cfg)

    def head_backward(self, cache, dloss=1.0):
        """(dh (B, N, D), {name: gradient}) of dloss * loss; add them with add_head_grads."""
        return self.head.backward(cache, dloss)

    # ------------------------------------------------------------ metric and evaluation

    def metric(self, totals):
        """The task's metric from summed outputs."""
        if totals["count"] == 0:
            raise ValueError("totals: no scored target, the metric is undefined")
        return self._metric(totals)

    def evaluate(self, split, body, params, cfg, batch_size=EVAL_BATCH, max_examples=0):
        """{"loss": nats per scored target, metric_name: value, "count": scored targets}
        over the fixed batches of `split`; body(tokens, key_mask) -> h (B, N, D)."""
        totals = {"nats": 0.0, "count": 0, "correct": 0}
        for batch in self.eval_batches(split, batch_size, max_examples):
            h = body(batch.tokens, batch.key_mask)
            _, _, out = self.head_forward(h, params, batch, cfg)
            for key in totals:
                totals[key] += out[key]
        return {"loss": totals["nats"] / totals["count"], self.metric_name: self.metric(totals),
                "count": totals["count"]}

    def baseline(self, split):
        """(what it is, value of the metric) of a trivial predictor on `split` (the
        majority class, chance), the figure a trained model must beat; None if none."""
        return None

    def summary(self):
        """One line for the log: what the task is and how big its splits are."""
        return f"{self.name} ({', '.join(f'{k}={v}' for k, v in self.params.items())})"

    def check_model(self, cfg):
        """Raise ValueError unless the model config fits the task (vocabulary, positions)."""
        if cfg.vocab_size != self.vocab_size:
            raise ValueError(f"vocab_size: task {self.name!r} needs {self.vocab_size}, "
                             f"the model has {cfg.vocab_size}")
        if cfg.max_len < self.seq_len:
            raise ValueError(f"max_len: task {self.name!r} has rows of up to {self.seq_len} "
                             f"tokens, the model's positional table has {cfg.max_len}")

    def _check_split(self, split):
        if split not in self.splits:
            raise ValueError(f"split: task {self.name!r} has splits {self.splits}, got {split!r}")


# ---------------------------------------------------------------- parameter checks and cache

def check_int(name, value, low, high=None):
    """value as an int in [low, high], else ValueError naming the parameter."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low \
        and (high is None or value <= high)
    if not ok:
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {span}, got {value!r}")
    return int(value)


def default_cache_dir():
    """Where generated splits are kept unless a run says otherwise: $GMA_NP_CACHE, else
    the user's cache directory (XDG_CACHE_HOME or ~/.cache) / gma_np."""
    if os.environ.get("GMA_NP_CACHE"):
        return os.environ["GMA_NP_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gma_np")


def split_rng(seed, split, tag):
    """The Generator of one split of one task: independent of the other splits and tasks."""
    index = {"train": 0, "val": 1, "test": 2}[split]
    return np.random.default_rng([check_int("seed", seed, 0), index, tag])


def pad_rows(rows, pad_id=0):
    """(tokens (B, N) int64, key_mask (B, N) bool) of variable-length rows, padded at the
    end to the longest; key_mask is True on the real tokens."""
    lengths = np.array([len(r) for r in rows])
    tokens = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens, np.arange(tokens.shape[1])[None, :] < lengths[:, None]
