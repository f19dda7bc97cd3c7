"""Run a model over rows of its task and collect, per layer and head, what the analyses read.

Dimension legend: B rows (windows), N tokens per row, D model width, H heads, d query/key
head size, e value head size, K components.

Nothing of the model is re-implemented: the blocks run through the model's own
gma_np.nn.model.block_forward, causally or bidirectionally with the rows' key mask as
the run trained it (gma_np.tasks.body_causal), whose initialisation hook (`set_mixer`)
hands over each mixer's input h (B, N, D) and changes nothing (it returns no
parameters). From h and the attention shell's projections (gma_np.mixers.attention)
come q, k, v, and from the layer's mixture the responsibilities, through
gma_np.responsibilities:

    q = split_heads(h W_q + b_q)   (B, H, N, d)      r_q = r(q), r_k = r(k)   (B, H, N, K)

Padding positions (key_mask False) are computed like any other and kept in the arrays;
the layer gives their keys no weight, and every statistic selects the real tokens
(`Sample.real`) before it counts anything.

With targets, the gradient of the task's loss reaching each layer's GMA output,
do (B, H, N, e), comes from the model's own body_forward / body_backward and its head
(the token head's next-token loss, or a task's, e.g. the pooled classifier's): the
mixer in each block's cache is swapped for a copy whose backward records the gradient
dy (B, N, D) it receives and then runs the original; do = split_heads(dy W_o^T), since
the shell's output is y = merge_heads(o) W_o + b_o.

`usage_summary(model, batch)` is the few scalars the trainer logs at every evaluation.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from gma_np import responsibilities
from gma_np.analysis.categories import byte_attributes, byte_classes
from gma_np.analysis.usage import usage_stats
from gma_np.mixers.attention import split_heads
from gma_np.mixers.contract import Mixer
from gma_np.nn.heads import pooled_classifier_forward
from gma_np.nn.model import _block_params, _mixer_params, block_forward, body_backward, body_forward
from gma_np.tasks.base import Batch

# The shell parameters a mixer must have for q, k, v to exist (attention-style mixers).
PROJECTIONS = ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo")
# The parameters that make an attention-style mixer a GMA one.
MIXTURE = ("means", "log_var", "logits")


class AnalysisError(ValueError):
    """A run or model the analysis cannot read (no queries and keys, no mixture, ...)."""


@dataclass
class LayerSample:
    """One layer's arrays over the sample, float64."""
    h: np.ndarray              # (B, N, D) the mixer's input
    q: np.ndarray              # (B, H, N, d)
    k: np.ndarray              # (B, H, N, d)
    v: np.ndarray              # (B, H, N, e)
    rq: np.ndarray = None      # (B, H, N, K) responsibilities of the queries (GMA only)
    rk: np.ndarray = None      # (B, H, N, K) of the keys
    mixture: dict = None       # means (H, K, d), log_var, logits (H, K), temperature (H,)
    do: np.ndarray = None      # (B, H, N, e) gradient of the loss at GMA's output (with targets)


@dataclass
class Sample:
    tokens: np.ndarray         # (B, N) int64 token ids (bytes for a language model)
    layers: list               # one LayerSample per layer
    mixer: str                 # the model's mixer name
    loss: float = None         # the head's mean loss in nats (with targets)
    key_mask: np.ndarray = None   # (B, N) bool, True = a real token; None = no padding
    causal: bool = True        # how the body ran
    outputs: dict = None       # the head's sums {"nats", "count", "correct"} (with targets)
    row_labels: np.ndarray = None  # (B,) the class of each row (a classification head's targets)
    predicted: np.ndarray = None   # (B,) the class the model predicts for each row (a classifier)

    @property
    def real(self):
        """(B, N) bool: the real tokens, the ones every statistic counts."""
        return (np.ones(self.tokens.shape, dtype=bool) if self.key_mask is None
                else self.key_mask)


def is_gma(model):
    mp = _mixer_params(_block_params(model.arrays(), 0), model.cfg)
    return all(name in mp for name in MIXTURE)


def _attention_params(model):
    """The mixer arrays of every layer; AnalysisError if the mixer has no q and k."""
    cfg, arrays = model.cfg, model.arrays()
    out = [_mixer_params(_block_params(arrays, l), cfg) for l in range(cfg.n_layers)]
    missing = [n for n in PROJECTIONS if n not in out[0]]
    if missing:
        raise AnalysisError(f"model: the {cfg.mixer!r} mixer has no query/key projections "
                            f"(no {', '.join(missing)}); the analysis reads attention-style mixers")
    return out


def _mixture_of(mp):
    tau = np.exp(mp["log_tau"].astype(np.float64)) if "log_tau" in mp else None
    H = mp["logits"].shape[0]
    return {"means": mp["means"].astype(np.float64), "log_var": mp["log_var"].astype(np.float64),
            "logits": mp["logits"].astype(np.float64),
            "temperature": np.ones(H) if tau is None else tau}


def _recording_backward(cache, record):
    """`cache` with each block's Mixer replaced by one whose backward stores its dy in
    record[layer] (layers in the order the blocks appear) before running the original."""
    count = [0]

    def walk(node):
        if isinstance(node, Mixer):
            layer, inner = count[0], node.backward
            count[0] += 1

            def backward(dy, c):
                record[layer] = dy
                return inner(dy, c)
            return dataclasses.replace(node, backward=backward)
        if type(node) is tuple:
            return tuple(walk(x) for x in node)
        if type(node) is list:
            return [walk(x) for x in node]
        return node
    return walk(cache), count[0]


def _upstream(model, batch, causal):
    """(loss, outputs, [dy (B, N, D) per layer]): the gradient of the head's mean loss at
    each mixer's output, through the model's own body and head."""
    cfg, arrays = model.cfg, model.arrays()
    h, c_body = body_forward(arrays, batch.tokens, cfg, causal=causal, key_mask=batch.key_mask)
    loss, c_head, outputs = model.head.forward(h, arrays, batch, cfg)
    if getattr(model.head, "kind", None) == "classifier":       # the classes the model predicts
        _, logits, _ = pooled_classifier_forward(h, arrays["cls.W"], arrays["cls.b"], batch.targets,
                                                 batch.key_mask, model.head.pool)
        outputs = dict(outputs, predicted=logits.argmax(axis=-1).astype(np.int64))
    record = {}
    c_body, found = _recording_backward(c_body, record)
    if found != cfg.n_layers:
        raise RuntimeError(f"found {found} mixers in the model's cache, expected one per layer "
                           f"({cfg.n_layers}): gma_np.nn.model's cache layout changed")
    dh, _ = model.head.backward(c_head)
    body_backward(dh, c_body)
    return float(loss), outputs, [record[l] for l in range(cfg.n_layers)]


def _check_targets(model, idx, targets, loss_mask):
    """targets (B, N) of a token head or (B,) class labels of a classifier, checked."""
    targets = np.asarray(targets)
    if getattr(model.head, "kind", "token") == "token":
        targets = model._check_ids(targets, "targets")
        if targets.shape != idx.shape:
            raise ValueError(f"targets: expected the shape of idx {idx.shape}, got {targets.shape}")
    else:
        n = model.head.n_classes
        if targets.dtype.kind not in "iu" or targets.shape != idx.shape[:1]:
            raise ValueError(f"targets: expected ({idx.shape[0]},) integer class labels, got "
                             f"{targets.dtype} of shape {targets.shape}")
        if targets.size and (targets.min() < 0 or targets.max() >= n):
            raise ValueError(f"targets: expected labels in [0, {n}), got range "
                             f"[{targets.min()}, {targets.max()}]")
    if loss_mask is not None:
        loss_mask = np.asarray(loss_mask)
        if loss_mask.dtype != np.bool_ or loss_mask.shape != idx.shape:
            raise ValueError(f"loss_mask: expected a bool array of shape {idx.shape} or None, "
                             f"got {loss_mask.dtype} of shape {loss_mask.shape}")
    return targets.astype(np.int64), loss_mask


def collect(model, idx, targets=None, *, causal=True, key_mask=None, loss_mask=None):
    """The Sample of `model` (a gma_np.nn.LanguageModel, with its task's head) on the rows
    idx (B, N), the body run causally or not and with key_mask (B, N) bool (True = a real
    token) as the run trained it; with targets ((B, N) next tokens for a token head, (B,)
    class labels for a classifier; loss_mask where a token head scores), the gradients at
    each GMA output too (module docstring)."""
    idx = model._check_ids(idx)
    key_mask = model._check_mask(key_mask, idx)
    cfg, arrays = model.cfg, model.arrays()
    if idx.shape[1] > cfg.max_len:
        raise ValueError(f"idx: expected at most max_len = {cfg.max_len} tokens per window "
                         f"(the positional table), got shape {idx.shape}")
    if key_mask is not None and not key_mask.any(axis=1).all():
        raise ValueError("key_mask: expected at least one real token in every row")
    params = _attention_params(model)
    gma = all(name in params[0] for name in MIXTURE)
    H = cfg.n_heads
    inputs = []

    def keep_input(h, mp):
        inputs.append(h)
        return {}                                   # set nothing: the block runs unchanged
    x = arrays["wte"][idx] + arrays["wpe"][:idx.shape[1]]
    for l in range(cfg.n_layers):
        x, _ = block_forward(x, _block_params(arrays, l), cfg, set_mixer=keep_input,
                             causal=causal, key_mask=key_mask)
    loss, outputs, upstream, row_labels, predicted = None, None, None, None, None
    if targets is not None:
        targets, loss_mask = _check_targets(model, idx, targets, loss_mask)
        loss, outputs, upstream = _upstream(model, Batch(idx, targets, key_mask, loss_mask), causal)
        row_labels = targets if targets.ndim == 1 else None
        predicted = outputs.pop("predicted", None)
    layers = []
    for l, (h, mp) in enumerate(zip(inputs, params)):
        h = h.astype(np.float64)
        q, k, v = (split_heads(h @ mp[W].astype(np.float64) + mp[b].astype(np.float64), H)
                   for W, b in (("Wq", "bq"), ("Wk", "bk"), ("Wv", "bv")))
        layer = LayerSample(h=h, q=q, k=k, v=v)
        if gma:
            mix = _mixture_of(mp)
            layer.mixture = mix
            layer.rq, layer.rk = (responsibilities(x_, mix["means"], mix["log_var"], mix["logits"],
                                                   mix["temperature"]) for x_ in (q, k))
        if upstream is not None:
            layer.do = split_heads(upstream[l].astype(np.float64) @ mp["Wo"].astype(np.float64).T, H)
        layers.append(layer)
    return Sample(tokens=idx.astype(np.int64), layers=layers, mixer=cfg.mixer, loss=loss,
                  key_mask=key_mask, causal=bool(causal), outputs=outputs, row_labels=row_labels,
                  predicted=predicted)


def sample_windows(data, context, n_windows, rng):
    """(idx, targets, previous): n_windows random windows of `data` (uint8), sorted by
    start, each (n, context); previous (n,) the byte before each window (-1 at the start)."""
    data = np.asarray(data)
    n_starts = len(data) - context
    if n_starts < 1:
        raise AnalysisError(f"data: the validation split has {len(data)} bytes, fewer than "
                            f"the {context + 1} a window needs")
    starts = np.sort(rng.choice(n_starts, size=min(n_windows, n_starts), replace=False))
    window = data[starts[:, None] + np.arange(context + 1)].astype(np.int64)
    previous = np.where(starts > 0, data[np.maximum(starts - 1, 0)].astype(np.int64), -1)
    return window[:, :-1], window[:, 1:], previous


def sample_task_rows(task, split, n_rows, rng):
    """A Batch of n_rows distinct rows of `task`'s `split` (all of them when it has fewer),
    drawn without replacement from its fixed evaluation rows (task.eval_batches) and kept
    in their order, padded at the end to the longest drawn row (key_mask False there;
    None when no row is padded). Class labels (B,) or per-token targets and loss_mask
    (B, N) come along."""
    parts = list(task.eval_batches(split))
    if not parts:
        raise AnalysisError(f"data: the {split} split of task {task.name!r} has no rows")
    width = max(b.tokens.shape[1] for b in parts)

    def widen(a, fill):                                          # (b, n) -> (b, width)
        out = np.full((a.shape[0], width), fill, dtype=a.dtype)
        out[:, :a.shape[1]] = a
        return out
    tokens = np.concatenate([widen(b.tokens, 0) for b in parts])
    mask = np.concatenate([widen(np.ones(b.tokens.shape, dtype=bool) if b.key_mask is None
                                 else b.key_mask, False) for b in parts])
    per_token = parts[0].targets.ndim == 2
    targets = np.concatenate([widen(b.targets, 0) if per_token else b.targets for b in parts])
    scored = None
    if per_token and any(b.loss_mask is not None for b in parts):
        scored = np.concatenate([widen(np.ones(b.tokens.shape, dtype=bool) if b.loss_mask is None
                                       else b.loss_mask, False) for b in parts])
    rows = np.sort(rng.choice(len(tokens), size=min(n_rows, len(tokens)), replace=False))
    mask = mask[rows]
    n = int(np.flatnonzero(mask.any(axis=0)).max()) + 1          # drop columns of padding only
    mask = mask[:, :n]
    return Batch(tokens[rows, :n].astype(np.int64),
                 targets[rows, :n] if per_token else targets[rows].astype(np.int64),
                 None if mask.all() else mask,
                 None if scored is None else scored[rows, :n])


def window_categories(tokens, previous):
    """(attributes {name: bool (B, N)}, classes (B, N)) of windows of bytes."""
    attrs = [byte_attributes(t, None if p < 0 else int(p)) for t, p in zip(tokens, previous)]
    return ({name: np.stack([a[name] for a in attrs]) for name in attrs[0]},
            np.stack([byte_classes(t) for t in tokens]))


def usage_summary(model, batch, *, causal=True, key_mask=None):
    """A few scalars of the routing of `model` on `batch` (idx (B, N), or (idx, targets)),
    the body run causally or not, over the real tokens of key_mask (B, N) bool (None: all),
    for the run log at every evaluation:

        eff_components       mean over layers, heads and {queries, keys} of exp(H(usage))
        eff_components_min   its minimum: a collapsing head shows here first
        token_entropy        mean per-token responsibility entropy, nats (max log K)
        dead_q, dead_k       dead components of queries, of keys, summed over layers and heads

    {} for a model whose mixer is not GMA (nothing to summarise)."""
    idx = batch[0] if isinstance(batch, tuple) else batch
    if not is_gma(model):
        return {}
    sample = collect(model, idx, causal=causal, key_mask=key_mask)
    real = sample.real
    eff, ent, dead = [], [], {"q": 0, "k": 0}
    for layer in sample.layers:
        for name, r in (("q", layer.rq), ("k", layer.rk)):
            for h in range(r.shape[1]):
                s = usage_stats(r[:, h][real])
                eff.append(s["effective_components"])
                ent.append(s["token_entropy"])
                dead[name] += s["n_dead"]
    return {"eff_components": round(float(np.mean(eff)), 4),
            "eff_components_min": round(float(np.min(eff)), 4),
            "token_entropy": round(float(np.mean(ent)), 4),
            "dead_q": dead["q"], "dead_k": dead["k"]}
