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

The three input projections are one product (`project_fused`; F = 2 H d + H e):

    [Q | K | V] = X [W_q | W_k | W_v] + [b_q | b_k | b_v]        (B, N, F)

with the concatenated weight (D, F) built per call from the separate parameters (a
copy of D F elements against B N D F multiply-adds), so the names, the checkpoints
and the parameter dict stay those above. Its backward writes dQ, dK, dV into one
(B, N, F) array, in their column ranges, and makes one linear_backward of it:

    dX = [dQ | dK | dV] [W_q | W_k | W_v]^T = dQ W_q^T + dK W_k^T + dV W_v^T
    dW = X^T [dQ | dK | dV]   (D, F),   db = column sums of [dQ | dK | dV]   (F,)

the contraction over F summing the three dX terms, and dW, db cut back into
gWq, gWk, gWv, gbq, gbk, gbv (copies: each gradient its own contiguous array).
`project_separate` / `project_separate_backward` are the naive form (three products);
`attention_mixer(..., fused=False)` builds the shell on them, and
tests/test_attention_fused.py checks the two against each other for every attention
mixer. decode() keeps three products: for a chunk of one token the concatenation
would copy as many elements as the product reads, and cost more than it saves.
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


def split_qkv(qkv, H, d, e):
    """(B, N, 2 H d + H e) -> Q, K (B, H, N, d), V (B, H, N, e), each C-contiguous.

    When d == e, one transposing copy to (3, B, H, N, d), whose [0], [1], [2] are
    contiguous views; else one copy of each column range."""
    B, N, _ = qkv.shape
    if d == e:
        qkv = np.ascontiguousarray(qkv.reshape(B, N, 3, H, d).transpose(2, 0, 3, 1, 4))
        return qkv[0], qkv[1], qkv[2]
    Hd = H * d
    return (np.ascontiguousarray(qkv[:, :, :Hd].reshape(B, N, H, d).transpose(0, 2, 1, 3)),
            np.ascontiguousarray(qkv[:, :, Hd:2 * Hd].reshape(B, N, H, d).transpose(0, 2, 1, 3)),
            np.ascontiguousarray(qkv[:, :, 2 * Hd:].reshape(B, N, H, e).transpose(0, 2, 1, 3)))


def merge_qkv(dq, dk, dv):
    """dQ, dK (B, H, N, d), dV (B, H, N, e) -> (B, N, 2 H d + H e), heads merged.

    Each is written once, straight into its column range of the result (a view of the
    range split as (B, N, H, c) is always possible: it only splits the last axis)."""
    B, H, N, d = dq.shape
    e = dv.shape[3]
    out = np.empty((B, N, H * (2 * d + e)), dtype=np.result_type(dq, dk, dv))
    lo = 0
    for g, c in ((dq, d), (dk, d), (dv, e)):
        out[:, :, lo:lo + H * c].reshape(B, N, H, c).transpose(0, 2, 1, 3)[...] = g
        lo += H * c
    return out


def project_fused(x, p, H, d, e):
    """Q, K (B, H, N, d), V (B, H, N, e) from one product (module docstring), and its cache."""
    W = np.concatenate((p["Wq"], p["Wk"], p["Wv"]), axis=1)       # (D, F)
    b = np.concatenate((p["bq"], p["bk"], p["bv"]))                # (F,)
    qkv, cache = linear_forward(x, W, b)                           # (B, N, F)
    return (*split_qkv(qkv, H, d, e), cache)


def project_fused_backward(dq, dk, dv, cache):
    """(dx, {Wq, bq, Wk, bk, Wv, bv: gradient}) of project_fused."""
    Hd = dq.shape[1] * dq.shape[3]
    # in the forward pass this was: [q | k | v] = x [Wq | Wk | Wv] + [bq | bk | bv]
    dx, dW, db = linear_backward(merge_qkv(dq, dk, dv), cache)     # (B, N, D), (D, F), (F,)
    g = {}
    for (W, bias), cols in ((("Wq", "bq"), slice(0, Hd)), (("Wk", "bk"), slice(Hd, 2 * Hd)),
                            (("Wv", "bv"), slice(2 * Hd, None))):
        g[W] = np.ascontiguousarray(dW[:, cols])
        g[bias] = db[cols].copy()
    return dx, g


def project_separate(x, p, H):
    """The naive form of project_fused: three products, each split into heads."""
    q, cq = linear_forward(x, p["Wq"], p["bq"])                    # (B, N, H*d)
    k, ck = linear_forward(x, p["Wk"], p["bk"])                    # (B, N, H*d)
    v, cv = linear_forward(x, p["Wv"], p["bv"])                    # (B, N, H*e)
    return split_heads(q, H), split_heads(k, H), split_heads(v, H), (cq, ck, cv)


def project_separate_backward(dq, dk, dv, cache):
    """The naive form of project_fused_backward: three linear_backward, dx summed."""
    cq, ck, cv = cache
    g = {}
    dx, g["Wq"], g["bq"] = linear_backward(merge_heads(dq), cq)
    dxk, g["Wk"], g["bk"] = linear_backward(merge_heads(dk), ck)
    dxv, g["Wv"], g["bv"] = linear_backward(merge_heads(dv), cv)
    dx += dxk
    dx += dxv
    return dx, g


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


def attention_mixer(name, core, *, fused=True):
    """The Mixer of an attention-style core module (module docstring).

    fused=False: the q, k, v projections as three products (project_separate), the
    naive form the fused shell is tested against."""
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
        """Q, K (B, H, N, d) and V (B, H, N, e), and the cache of the projections."""
        if fused:
            return project_fused(x, p, cfg.n_heads, cfg.head_dim, cfg.value_dim)
        return project_separate(x, p, cfg.n_heads)

    project_backward = project_fused_backward if fused else project_separate_backward

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
        g = {}
        # 3. in the forward pass this was: y = concat_h(o_h) Wo + bo
        do, g["Wo"], g["bo"] = linear_backward(dy, c_out)            # (B, N, H*e)
        # 2. in the forward pass this was: o = core(q, k, v)
        dq, dk, dv, g_core = core.backward(split_heads(do, H), c_core)
        g.update(g_core)
        # 1. in the forward pass this was: q, k, v = x W + b, split into heads
        dx, g_proj = project_backward(dq, dk, dv, c_proj)
        g.update(g_proj)
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
        # three products, without linear_forward's caches and checks: a decoding chunk is
        # often one token, where those, and concatenating the weights (project_fused),
        # cost more than the products
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
