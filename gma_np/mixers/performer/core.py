"""FAVOR+ random-feature attention as an attention core of the shared multi-head shell
(gma_np.mixers.attention).

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head size,
m random features per head.

The core has no trained parameters. It has one buffer, the random projections
"projections" (H, m, d): drawn from the model's rng at initialisation, saved in the
checkpoint, and replaced only by `redraw`, which the trainer calls every
cfg.feature_redraw steps (0: never). Config fields read: n_heads, head_dim, value_dim,
n_features (m, default 64), feature_redraw (read by the trainer, not here).

forward / backward are performer_attention_forward / _backward (ops.py); decoding is
performer_attention_recurrent, whose state is the (m, e) memory and its normaliser,
m (e + 1) numbers per head whatever the position. A decoding state belongs to the
projections it was built with: after a redraw, start a new one.
"""

import sys

from gma_np.mixers.attention import attention_mixer
from gma_np.mixers.performer.features import draw_projections
from gma_np.mixers.performer.ops import (
    init_performer_state,
    performer_attention_backward,
    performer_attention_forward,
    performer_attention_recurrent,
)
from gma_np.mixers.performer.naive import performer_attention_dense

# FAVOR+ has a bidirectional form.
CAUSAL_ONLY = False

# Random features per head when the config does not say (the paper's experiments use
# a few hundred at d = 64; 64 keeps the tiny preset's cost near the other mixers').
DEFAULT_FEATURES = 64


def n_features(cfg):
    return getattr(cfg, "n_features", DEFAULT_FEATURES)


def BUFFER_SHAPES(cfg):
    return {"projections": (cfg.n_heads, n_features(cfg), cfg.head_dim)}


def init_buffers(cfg, rng):
    """The projections, drawn from `rng` (features.draw_projections)."""
    return {"projections": draw_projections(cfg.n_heads, n_features(cfg), cfg.head_dim, rng)}


def redraw(buffers, cfg, rng):
    """New projections from `rng`, as a new dict: `buffers` is not modified."""
    if "projections" not in buffers:
        raise KeyError(f"buffers: expected the performer's 'projections', got {sorted(buffers)}")
    return {**buffers, **init_buffers(cfg, rng)}


def forward(q, k, v, p, cfg, *, causal, key_mask=None):
    return performer_attention_forward(q, k, v, p["projections"], causal=causal, key_mask=key_mask)


def backward(do, cache):
    g = performer_attention_backward(do, cache)
    return g["q"], g["k"], g["v"], {}


def reference(q, k, v, p, cfg, *, causal, key_mask=None):
    """The dense N x N form of the definition with the paper's unstabilised features
    (naive.py), float64."""
    return performer_attention_dense(q, k, v, p["projections"], causal=causal, key_mask=key_mask)


def decode_init(B, p, cfg):
    """The empty memory: S = 0 (B, H, m, e), z = 0 (B, H, m)."""
    return init_performer_state(B, cfg.n_heads, n_features(cfg), cfg.value_dim)


def decode(q, k, v, p, cfg, state):
    return performer_attention_recurrent(q, k, v, p["projections"], state)


MIXER = attention_mixer("performer", sys.modules[__name__])
