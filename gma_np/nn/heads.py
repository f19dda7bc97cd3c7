"""Task heads: what turns the model body's last hidden states into a loss.

Dimension legend: B batch, N tokens, D model width, V vocabulary, C classes.

The model body (embeddings, blocks, final layernorm) gives h (B, N, D); a head maps
h to logits and a mean cross-entropy in nats. Each head is a forward/backward pair:

    loss, logits, cache = <head>_forward(h, params..., targets, masks...)
    dh, dparams... = <head>_backward(cache, dloss=1.0)

Two heads:

    token head        logits[b, n] = h[b, n] W                         (B, N, V)
                      loss = CE over the positions where loss_mask is True (all when None);
                      W = wte^T for tied embeddings (the caller transposes the gradient back)
    pooled classifier pooled[b] = pool(h[b])                            (B, D)
                      logits[b] = pooled[b] W + b                       (B, C)
                      loss = mean over b of CE(logits[b], labels[b])
                      pool "mean": the mean over the real tokens (key_mask True) of the row,
                      pool "first": h[b, 0], the state of a class token put first

The layers they are built of (linear, cross-entropy, masked mean pool) are
gma_np.nn.layers; tests/test_tasks.py gradchecks every head in float64, every element.

The head objects (`TokenHead`, `PooledClassifierHead`) wrap those pairs with the head's
own parameters, named in the model's flat dict, so a model is "a body plus a head":

    head.shapes(cfg) -> {name: shape}      head.init(cfg, rng) -> {name: float64 array}
    head.forward(h, params, batch, cfg) -> (loss, cache, outputs)
    head.backward(cache, dloss=1.0) -> (dh, {name: gradient})

`batch` is anything with `targets`, `key_mask` and `loss_mask` (gma_np.tasks.Batch);
`outputs` are sums, {"nats", "count", "correct"}, so evaluation adds batches exactly.
A head may read a body parameter (the tied token head reads "wte"); `add_head_grads`
adds its gradient to the body's.
"""

import numpy as np

from gma_np.nn import layers as L
from gma_np.nn.layers import INIT_STD

POOLS = ("mean", "first")


# ---------------------------------------------------------------- token head

def token_head_forward(h, W, targets, loss_mask=None):
    """Next-token logits and their mean cross-entropy.

    h (B, N, D), W (D, V), targets (B, N) int in [0, V), loss_mask (B, N) bool or None.
    Returns (loss in nats, logits (B, N, V), cache). Cache: the linear's and the
    cross-entropy's (the input h, W, the softmax probabilities and the mask weights)."""
    _check_mask("loss_mask", loss_mask, h.shape[:2])
    logits, c_lin = L.linear_forward(h, W, None)                    # (B, N, V)
    loss, c_ce = L.cross_entropy_forward(logits, np.asarray(targets), loss_mask)
    return loss, logits, (c_lin, c_ce)


def token_head_backward(cache, dloss=1.0):
    """(dh (B, N, D), dW (D, V)) of dloss * loss."""
    c_lin, c_ce = cache
    # 2. loss = CE(logits, targets, loss_mask)
    dlogits = L.cross_entropy_backward(dloss, c_ce)                 # (B, N, V)
    # 1. logits = h W
    dh, dW, _ = L.linear_backward(dlogits, c_lin)
    return dh, dW


# ---------------------------------------------------------------- pooled classifier

def pool_forward(h, key_mask=None, pool="mean"):
    """pooled (B, D) of h (B, N, D): the masked mean over real tokens, or the first token."""
    if pool not in POOLS:
        raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
    _check_mask("key_mask", key_mask, h.shape[:2])
    if pool == "mean":
        pooled, c = L.masked_mean_pool_forward(h, key_mask)
        return pooled, ("mean", c)
    if key_mask is not None and not np.asarray(key_mask)[:, 0].all():
        bad = np.flatnonzero(~np.asarray(key_mask)[:, 0]).tolist()
        raise ValueError(f"key_mask: pool 'first' reads token 0, which is padding in rows {bad}")
    return h[:, 0], ("first", h.shape)


def pool_backward(dpooled, cache):
    """dh (B, N, D) of pool_forward."""
    pool, c = cache
    if pool == "mean":
        # in the forward pass this was: pooled[b] = sum_n w[b, n] h[b, n], w = mask / count
        return L.masked_mean_pool_backward(dpooled, c)
    # in the forward pass this was: pooled[b] = h[b, 0]
    dh = np.zeros(c, dtype=dpooled.dtype)
    dh[:, 0] = dpooled
    return dh


def pooled_classifier_forward(h, W, b, labels, key_mask=None, pool="mean"):
    """Sequence classification: pool, a linear classifier, the mean cross-entropy.

    h (B, N, D), W (D, C), b (C,), labels (B,) int in [0, C), key_mask (B, N) bool or
    None (True = a real token). Returns (loss in nats, logits (B, C), cache).
    Cache: the pool's (its weights w = mask / count, or the shape), the linear's
    (pooled, W) and the cross-entropy's."""
    labels = np.asarray(labels)
    if labels.shape != (h.shape[0],):
        raise ValueError(f"labels: expected shape ({h.shape[0]},), got {labels.shape}")
    # 1. pooled = pool(h, key_mask)
    pooled, c_pool = pool_forward(h, key_mask, pool)                 # (B, D)
    # 2. logits = pooled W + b
    logits, c_lin = L.linear_forward(pooled, W, b)                   # (B, C)
    # 3. loss = mean_b CE(logits[b], labels[b])
    loss, c_ce = L.cross_entropy_forward(logits, labels)
    return loss, logits, (c_pool, c_lin, c_ce)


def pooled_classifier_backward(cache, dloss=1.0):
    """(dh (B, N, D), dW (D, C), db (C,)) of dloss * loss."""
    c_pool, c_lin, c_ce = cache
    # 3. loss = mean_b CE(logits[b], labels[b])
    dlogits = L.cross_entropy_backward(dloss, c_ce)                  # (B, C)
    # 2. logits = pooled W + b
    dpooled, dW, db = L.linear_backward(dlogits, c_lin)              # (B, D)
    # 1. pooled = pool(h, key_mask)
    return pool_backward(dpooled, c_pool), dW, db


def _check_mask(name, mask, shape):
    if mask is None:
        return
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != tuple(shape):
        raise ValueError(f"{name}: expected a bool array of shape {tuple(shape)} or None, "
                         f"got dtype {mask.dtype} and shape {mask.shape}")


# ---------------------------------------------------------------- the heads as objects

class TokenHead:
    """Logits over the vocabulary at every position, cross-entropy where loss_mask is True.

    With tied embeddings the weight is wte^T (the body's token table) and the gradient
    is returned under "wte"; otherwise the head owns "head" (D, V), the name the language
    model has always used, so checkpoints keep their layout."""

    kind = "token"

    def shapes(self, cfg):
        return {} if cfg.tie_embeddings else {"head": (cfg.d_model, cfg.vocab_size)}

    def init(self, cfg, rng):
        return {name: rng.normal(0.0, INIT_STD, shape) for name, shape in self.shapes(cfg).items()}

    def weight(self, params, cfg):
        """W (D, V): wte^T when tied, else the head's own matrix."""
        return params["wte"].T if cfg.tie_embeddings else params["head"]

    def forward(self, h, params, batch, cfg):
        loss, logits, cache = token_head_forward(h, self.weight(params, cfg), batch.targets,
                                                 batch.loss_mask)
        scored = np.ones(batch.targets.shape, dtype=bool) if batch.loss_mask is None else batch.loss_mask
        count = int(scored.sum())
        correct = int(((logits.argmax(axis=-1) == batch.targets) & scored).sum())
        return loss, (cache, cfg.tie_embeddings), {"nats": loss * count, "count": count,
                                                    "correct": correct}

    def backward(self, cache, dloss=1.0):
        c, tied = cache
        dh, dW = token_head_backward(c, dloss)
        return dh, ({"wte": dW.T} if tied else {"head": dW})


class PooledClassifierHead:
    """Pool the real tokens ("mean", or "first" for a class token), then a linear classifier."""

    kind = "classifier"

    def __init__(self, n_classes, pool="mean"):
        if pool not in POOLS:
            raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
        self.n_classes, self.pool = n_classes, pool

    def shapes(self, cfg):
        return {"cls.W": (cfg.d_model, self.n_classes), "cls.b": (self.n_classes,)}

    def init(self, cfg, rng):
        return {"cls.W": rng.normal(0.0, INIT_STD, (cfg.d_model, self.n_classes)),
                "cls.b": np.zeros(self.n_classes)}

    def forward(self, h, params, batch, cfg):
        loss, logits, cache = pooled_classifier_forward(h, params["cls.W"], params["cls.b"],
                                                        batch.targets, batch.key_mask, self.pool)
        count = len(batch.targets)
        correct = int((logits.argmax(axis=-1) == batch.targets).sum())
        return loss, cache, {"nats": loss * count, "count": count, "correct": correct}

    def backward(self, cache, dloss=1.0):
        dh, dW, db = pooled_classifier_backward(cache, dloss)
        return dh, {"cls.W": dW, "cls.b": db}


def add_head_grads(body_grads, head_grads):
    """body_grads with the head's gradients added (summed where a name is in both: the tied
    embedding gets the body's and the head's); the body's order first, new names after."""
    out = dict(body_grads)
    for name, g in head_grads.items():
        out[name] = out[name] + g if name in out else g
    return out
