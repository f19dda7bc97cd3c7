"""Validation on a run's task, and text generation with the recurrent decode path.

`evaluate_task(model, task, split)` runs the task's fixed evaluation batches through
the model's body (causal or bidirectional, as the task trains) and the task's head:
{"loss": nats per scored target, <metric>: value, "count"} (gma_np.tasks.base.Task.evaluate).
For the language model the metric is bits per byte: the mean next-byte
cross-entropy in nats over the fixed validation windows, divided by ln 2, each
window from an empty memory, as in training; `evaluate_bpb` is the same figure for
a model and a byte split directly (gma_np.train.data.eval_batches).

Generation: the prompt is run through LanguageModel.decode in one chunk,
then one byte at a time, each from the logits of the previous step divided by
`temperature` (0 = greedy), optionally restricted to the `top_k` most likely.
Every step costs the same whatever the position (benchmarks/sampling.py).
"""

import math

import numpy as np

from gma_np.nn.layers import cross_entropy_forward
from gma_np.nn.decode import check_sampling
from gma_np.nn.model import body_forward
from gma_np.tasks import body_causal
from gma_np.train.data import eval_batches

# Validation windows per forward pass: bounds the activations' memory.
EVAL_BATCH = 64


def metric_key(task):
    """The key of the task's validation metric in log.jsonl and the checkpoint: "val_bpb"
    for the language model (as it has always been), "val_<metric name>" otherwise."""
    return f"val_{task.log_name or task.metric_name}"


def evaluate_task(model, task, split="val", max_examples=0, batch_size=EVAL_BATCH):
    """{"loss", task.metric_name, "count"} of `model` (body + the task's head) on the fixed
    batches of `split`; max_examples > 0: that many rows only."""
    arrays, cfg = model.arrays(), model.cfg
    causal = body_causal(task, cfg.mixer)

    def body(tokens, key_mask):
        return body_forward(arrays, tokens, cfg, causal=causal, key_mask=key_mask)[0]
    return task.evaluate(split, body, arrays, cfg, batch_size, max_examples)


def evaluate_bpb(model, data, context, max_tokens=0, batch_size=EVAL_BATCH):
    """Validation bits per byte of `model` on the split `data` (uint8)."""
    total_nats, total_tokens = 0.0, 0
    for idx, targets in eval_batches(data, context, batch_size, max_tokens):
        logits, _ = model.forward(idx)
        loss, _ = cross_entropy_forward(logits, targets)
        total_nats += loss * targets.size
        total_tokens += targets.size
    return total_nats / total_tokens / math.log(2.0)


def generate(model, prompt, n_tokens, *, temperature=0.8, top_k=0, rng=None):
    """prompt (bytes) followed by n_tokens sampled bytes, as bytes."""
    check_sampling(prompt, temperature, top_k)
    rng = np.random.default_rng(0) if rng is None else rng
    prompt = bytes(prompt) or b"\n"        # an empty prompt starts at a line break
    state = model.decode_init(1)
    logits, state = model.decode(np.frombuffer(prompt, dtype=np.uint8)[None, :].astype(np.int64), state)
    out = bytearray(prompt)
    last = logits[0, -1].astype(np.float64)                         # (V,)
    for _ in range(n_tokens):
        token = _pick(last, temperature, top_k, rng)
        out.append(token)
        logits, state = model.decode(np.array([[token]], dtype=np.int64), state)
        last = logits[0, -1].astype(np.float64)
    return bytes(out)


def _pick(logits, temperature, top_k, rng):
    """One token id from logits (V,) float64."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k:
        cut = np.partition(z, -top_k)[-top_k] if top_k < z.size else -np.inf
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))
