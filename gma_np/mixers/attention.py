"""The multi-head attention shell shared by every attention-style mixer.

Dimension legend: B batch, N tokens (n for a decoding chunk), D model width,
H heads, d query/key head size, e value head size.

GMA, softmax, linear and random-feature attention differ only in how the heads mix
(definition, section 4, for GMA); the projections around them are the same:

    Q = X W_q + b_q  -> (B, H, N, d)        K = X W_k + b_k  -> (B, H, N, d)
    V = X W_v + b_v  -> (B, H, N, e)
    O = core(Q, K, V; core parameters)      (B, H, N, e)
    Y = concat_h(O_h) W_o + b_o             (B, N, D)

so a mixer of this kind is written as a per-head *core* (a module with the names
below) and `attention_mixer(name, core)` turns it into a gma_np.mixers.contract.Mixer.
The core module defines:

    forward(q, k, v, p, cfg, *, causal, key_mask) -> (o, cache)
    backward(do, cache) -> (dq, dk, dv, {name: gradient of its parameters})
    decode_init(B, p, cfg) -> state;  decode(q, k, v, p, cfg, state) -> (o, state)
    reference(q, k, v, p, cfg, *, causal, key_mask) -> o     the naive form (dense or loop)
    optional: PARAMETER_SHAPES(cfg), init_parameters(cfg, rng)   its own trained parameters
              BUFFER_SHAPES(cfg), init_buffers(cfg, rng)         its untrained arrays
              (none of either when left out), redraw(buffers, cfg, rng),
              init_from_keys(k, p, cfg, rng), NO_DECAY, CAUSAL_ONLY

Parameters of the shell: Wq, Wk (D, H*d), bq, bk (H*d,), Wv (D, H*e), bv (H*e,),
Wo (H*e, D), bo (D,). Initialisation: normal(0, INIT_STD) for Wq, Wk, Wv; the output
projection normal(0, INIT_STD / sqrt(2 L)) (GPT-2's scaling of residual branches,
L = cfg.n_layers); biases 0.
"""

import numpy as np

from gma_np import _validation as check
from gma_np.mixers.contract import Mixer
from gma_np.nn.layers import INIT_STD, linear_backward, linear_forward

PROJECTIONS = ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo")


def split_heads(x, H):
    """(B, N, H*c) -> (B, H, N, c), contiguous."""
    B, N, Hc = x.shape
    return np.ascontiguousarray(x.reshape(B, N, H, Hc // H).transpose(0, 2, 1, 3))


def merge_heads(x):
    """(B, H, N, c) -> (B, N, H*c)."""
    B, H, N, c = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * c)


def projection_shapes(cfg):
    """The shell's parameters and their shapes."""
    D, H, d, e = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.value_dim
    return {"Wq": (D, H * d), "bq": (H * d,), "Wk": (D, H * d), "bk": (H * d,),
            "Wv": (D, H * e), "bv": (H * e,), "Wo": (H * e, D), "bo": (D,)}


def init_projections(cfg, rng):
    """Initial values of the shell's parameters (module docstring), float64."""
    out_std = INIT_STD / np.sqrt(2 * cfg.n_layers)
    params = {}
    for name, shape in projection_shapes(cfg).items():
        if name.startswith("b"):
            params[name] = np.zeros(shape)
        else:
            params[name] = rng.normal(0.0, out_std if name == "Wo" else INIT_STD, shape)
    return params


def check_input(x, cfg):
    """x must be a finite float32/float64 array (B, N, D) with D = cfg.d_model."""
    x = check.float_array("x", x, ndim=3)
    if x.shape[2] != cfg.d_model:
        raise ValueError(f"x: expected shape (B, N, D) with D = d_model = {cfg.d_model}, "
                         f"got {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"x: expected N >= 1 tokens, got shape {x.shape}")
    return x


def _core_params(p, core_names):
    return {name: p[name] for name in core_names}


def _none(*_):
    return {}


def attention_mixer(name, core):
    """The Mixer of an attention-style core module (module docstring)."""
    core_shapes = getattr(core, "PARAMETER_SHAPES", _none)
    core_init = getattr(core, "init_parameters", _none)
    buffer_shapes = getattr(core, "BUFFER_SHAPES", _none)
    init_buffers = getattr(core, "init_buffers", _none)

    def core_names(cfg):
        return tuple(core_shapes(cfg)) + tuple(buffer_shapes(cfg))

    def parameter_shapes(cfg):
        return {**projection_shapes(cfg), **core_shapes(cfg)}

    def init_parameters(cfg, rng):
        return {**init_projections(cfg, rng), **core_init(cfg, rng)}

    def project(x, p, cfg):
        """Q, K (B, H, N, d) and V (B, H, N, e), and the caches of the three projections."""
        H = cfg.n_heads
        q, cq = linear_forward(x, p["Wq"], p["bq"])                  # (B, N, H*d)
        k, ck = linear_forward(x, p["Wk"], p["bk"])                  # (B, N, H*d)
        v, cv = linear_forward(x, p["Wv"], p["bv"])                  # (B, N, H*e)
        return split_heads(q, H), split_heads(k, H), split_heads(v, H), (cq, ck, cv)

    def forward(x, p, cfg, *, causal, key_mask=None):
        check_input(x, cfg)
        # 1. projections, split into heads
        q, k, v, c_proj = project(x, p, cfg)
        # 2. the core mixes each head
        o, c_core = core.forward(q, k, v, _core_params(p, core_names(cfg)), cfg,
                                 causal=causal, key_mask=key_mask)   # (B, H, N, e)
        # 3. merge heads and project out
        y, c_out = linear_forward(merge_heads(o), p["Wo"], p["bo"])  # (B, N, D)
        return y, (c_proj, c_core, c_out, cfg.n_heads)

    def backward(dy, cache):
        c_proj, c_core, c_out, H = cache
        cq, ck, cv = c_proj
        g = {}
        # 3. in the forward pass this was: y = concat_h(o_h) Wo + bo
        do, g["Wo"], g["bo"] = linear_backward(dy, c_out)            # (B, N, H*e)
        # 2. in the forward pass this was: o = core(q, k, v)
        dq, dk, dv, g_core = core.backward(split_heads(do, H), c_core)
        g.update(g_core)
        # 1. in the forward pass this was: q, k, v = x W + b, split into heads
        dx, g["Wq"], g["bq"] = linear_backward(merge_heads(dq), cq)
        dxk, g["Wk"], g["bk"] = linear_backward(merge_heads(dk), ck)
        dxv, g["Wv"], g["bv"] = linear_backward(merge_heads(dv), cv)
        dx += dxk
        dx += dxv
        return dx, g

    def reference(x, p, cfg, *, causal, key_mask=None):
        check_input(x, cfg)
        H = cfg.n_heads
        q, k, v = (split_heads(x @ p[W] + p[b], H) for W, b in (("Wq", "bq"), ("Wk", "bk"), ("Wv", "bv")))
        o = core.reference(q, k, v, _core_params(p, core_names(cfg)), cfg, causal=causal,
                           key_mask=key_mask)
        return merge_heads(o) @ p["Wo"] + p["bo"]

    def decode_init(B, p, cfg):
        return core.decode_init(B, _core_params(p, core_names(cfg)), cfg)

    def decode(x, p, cfg, state):
        check_input(x, cfg)
        # the products of project() without linear_forward's caches and checks: a decoding
        # chunk is often one token, where those cost more than the products
        H = cfg.n_heads
        q, k, v = (split_heads(x @ p[W] + p[b], H) for W, b in (("Wq", "bq"), ("Wk", "bk"), ("Wv", "bv")))
        o, state = core.decode(q, k, v, _core_params(p, core_names(cfg)), cfg, state)
        return merge_heads(o) @ p["Wo"] + p["bo"], state

    init_from_data = None
    if hasattr(core, "init_from_keys"):
        def init_from_data(x, p, cfg, rng):
            k = split_heads(x @ p["Wk"] + p["bk"], cfg.n_heads)        # (B, H, N, d)
            return core.init_from_keys(k, _core_params(p, core_names(cfg)), cfg, rng)

    return Mixer(name=name, parameter_shapes=parameter_shapes, init_parameters=init_parameters,
                 forward=forward, backward=backward, decode_init=decode_init, decode=decode,
                 reference=reference,
                 buffer_shapes=buffer_shapes, init_buffers=init_buffers,
                 redraw=getattr(core, "redraw", None), init_from_data=init_from_data,
                 no_decay=frozenset(getattr(core, "NO_DECAY", ())),
                 causal_only=getattr(core, "CAUSAL_ONLY", False))
