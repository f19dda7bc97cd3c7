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
"""

import numpy as np

from gma_np.nn import layers as L

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
