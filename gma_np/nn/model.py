"""A GMA language model: the stateful shell over the layers, all of it in this file.

Dimension legend: B batch, N tokens, D d_model, V vocabulary, L layers, H heads,
d key head size, e value head size, K components, F = mlp_ratio * D.

    x = wte[idx] + wpe[0..N-1]                                  (B, N, D)
    for each of the L blocks (pre-norm residual):
        x = x + gma_layer(conv(layernorm(x)))                   causal GMA, section 4 of the definition
        x = x + mlp(layernorm(x))                               gelu MLP, D -> F -> D
    logits = layernorm(x) W_head                                (B, N, V); W_head = wte^T when tied

conv is an optional short depthwise causal convolution (width conv_width,
identity at initialisation; conv_width = 0 leaves it out and the block is the
plain section-4 layer). It hands each token its few predecessors, which the
GMA memory, a position-free average over routed slots, cannot single out
(docs/training.md, "Why a short convolution").

The parameters live in one flat dict name -> array (the names of
`parameter_shapes`), which is what the optimizer, the checkpoints and
gma_np.gradcheck see. `model_forward` / `model_backward` are the pure
functional pair; `GMALanguageModel` holds a config and the dict, and adds the
data-dependent mixture initialisation and the recurrent decode path.

Decode (docs/training.md, "Sampling"): per layer a gma_np.GMAState (the K-slot
memory, K*(e+1) numbers per head) plus one position index shared by the layers.
A token costs the same whatever its position. Past the positional table
(position >= max_len) the index is clamped to max_len - 1: every later token
gets the last learned position, while the GMA memory keeps reading the whole
prefix. tests/test_nn.py checks decode == full causal forward within max_len.
"""

from dataclasses import asdict, dataclass

import numpy as np

from gma_np.nn import layers as L
from gma_np.nn.gma_layer import gma_layer_backward, gma_layer_chunk, gma_layer_forward, project_keys
from gma_np.nn.mixture_init import fit_mixture

# Standard deviation of the initial weights (GPT-2's 0.02); output projections
# of residual branches are scaled by 1/sqrt(2 L) so the residual stream's
# variance does not grow with depth (GPT-2, section 2.3).
INIT_STD = 0.02
# Positional embeddings start smaller than token embeddings (GPT-2 uses 0.01).
POS_INIT_STD = 0.01


@dataclass
class ModelConfig:
    """Shape of a GMA language model. Every default is the `tiny` training preset's."""
    vocab_size: int = 256          # V: bytes
    max_len: int = 128             # rows of the positional table (training context)
    d_model: int = 128             # D: width of the residual stream
    n_layers: int = 2              # L: pre-norm blocks
    n_heads: int = 4               # H: GMA heads per layer
    head_dim: int = 32             # d: query/key size per head (H*d need not equal D)
    value_dim: int = 32            # e: value size per head
    n_components: int = 16         # K: mixture components (memory slots) per head
    covariance: str = "diag"       # "diag" (H, K, d) or "spherical" (H, K) log-variances
    learn_temperature: bool = True # a learned log-temperature per head (H,)
    norm: str = "row"              # GMA read-out normalisation, "row" or "slot"
    mlp_ratio: int = 4             # F = mlp_ratio * D
    conv_width: int = 4            # width of the causal convolution before each GMA layer (0 = none)
    tie_embeddings: bool = True    # logits = layernorm(x) wte^T (no separate head)
    dtype: str = "float32"         # compute dtype of parameters and activations

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "head_dim",
                     "value_dim", "n_components", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.conv_width, (int, np.integer)) or self.conv_width < 0:
            raise ValueError(f"conv_width: expected an integer >= 0, got {self.conv_width!r}")
        if self.covariance not in ("diag", "spherical"):
            raise ValueError(f"covariance: expected 'diag' or 'spherical', got {self.covariance!r}")
        if self.norm not in ("row", "slot"):
            raise ValueError(f"norm: expected 'row' or 'slot', got {self.norm!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {self.dtype!r}")


def parameter_shapes(cfg):
    """Every parameter's name and shape, in a fixed order."""
    D, H, d, e, K = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.value_dim, cfg.n_components
    F = cfg.mlp_ratio * D
    shapes = {"wte": (cfg.vocab_size, D), "wpe": (cfg.max_len, D)}
    for l in range(cfg.n_layers):
        b = f"h{l}."
        shapes.update({
            b + "ln1.g": (D,), b + "ln1.b": (D,),
            **({b + "conv.c": (cfg.conv_width, D)} if cfg.conv_width else {}),
            b + "gma.Wq": (D, H * d), b + "gma.bq": (H * d,),
            b + "gma.Wk": (D, H * d), b + "gma.bk": (H * d,),
            b + "gma.Wv": (D, H * e), b + "gma.bv": (H * e,),
            b + "gma.Wo": (H * e, D), b + "gma.bo": (D,),
            b + "gma.means": (H, K, d),
            b + "gma.log_var": (H, K, d) if cfg.covariance == "diag" else (H, K),
            b + "gma.logits": (H, K),
        })
        if cfg.learn_temperature:
            shapes[b + "gma.log_tau"] = (H,)
        shapes.update({
            b + "ln2.g": (D,), b + "ln2.b": (D,),
            b + "mlp.W1": (D, F), b + "mlp.b1": (F,),
            b + "mlp.W2": (F, D), b + "mlp.b2": (D,),
        })
    shapes.update({"lnf.g": (D,), "lnf.b": (D,)})
    if not cfg.tie_embeddings:
        shapes["head"] = (D, cfg.vocab_size)
    return shapes


def decays(name):
    """Whether AdamW decays a parameter: weight matrices and embeddings only.

    Not decayed: norm gains, biases and the convolution taps (decay would pull
    a gain or the identity tap to 0 for no reason) and the whole mixture: logits, means, log-variances and
    log-temperature (decay would pull the means to the origin, the variances to
    1, the mixture weights to uniform: a prior unrelated to weight size)."""
    last = name.rsplit(".", 1)[-1]
    return last in ("wte", "wpe", "head", "Wq", "Wk", "Wv", "Wo", "W1", "W2")


def init_params(cfg, rng):
    """Random initial parameters (dict of arrays in cfg.dtype). The mixtures get
    placeholders here; GMALanguageModel.init_mixtures fits them to data."""
    dtype = np.dtype(cfg.dtype)
    resid_std = INIT_STD / np.sqrt(2 * cfg.n_layers)
    params = {}
    for name, shape in parameter_shapes(cfg).items():
        last = name.rsplit(".", 1)[-1]
        if last in ("g",):
            value = np.ones(shape)
        elif last == "c":                       # the convolution starts as the identity
            value = np.zeros(shape)
            value[0] = 1.0
        elif last in ("Wo", "W2"):
            value = rng.normal(0.0, resid_std, shape)
        elif last == "wpe":
            value = rng.normal(0.0, POS_INIT_STD, shape)
        elif last in ("wte", "head", "Wq", "Wk", "Wv", "W1"):
            value = rng.normal(0.0, INIT_STD, shape)
        elif last == "means":
            value = rng.normal(0.0, 1.0, shape)
        else:                                   # biases, log_var, logits, log_tau
            value = np.zeros(shape)
        params[name] = value.astype(dtype)
    return params


def _block_params(params, l):
    """The parameters of block l, keyed without the "h{l}." prefix."""
    prefix = f"h{l}."
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def _gma_params(bp):
    return {name[4:]: value for name, value in bp.items() if name.startswith("gma.")}


def _head_weight(params, cfg):
    return params["wte"].T if cfg.tie_embeddings else params["head"]      # (D, V)


def block_forward(x, bp, cfg):
    """One pre-norm block: x + gma(conv(ln1(x))), then + mlp(ln2(.)). x (B, N, D)."""
    h, c_ln1 = L.layernorm_forward(x, bp["ln1.g"], bp["ln1.b"])
    c_conv = None
    if cfg.conv_width:
        h, c_conv = L.causal_conv_forward(h, bp["conv.c"])
    a, c_gma = gma_layer_forward(h, _gma_params(bp), n_heads=cfg.n_heads, causal=True, norm=cfg.norm)
    x = x + a
    h, c_ln2 = L.layernorm_forward(x, bp["ln2.g"], bp["ln2.b"])
    m, c_mlp = L.mlp_forward(h, bp["mlp.W1"], bp["mlp.b1"], bp["mlp.W2"], bp["mlp.b2"])
    return x + m, (c_ln1, c_conv, c_gma, c_ln2, c_mlp)


def block_backward(dx, cache):
    """(dx, grads keyed like the block's parameters without prefix) of block_forward."""
    c_ln1, c_conv, c_gma, c_ln2, c_mlp = cache
    g = {}
    # 4. x_out = x_mid + mlp(h2): the residual passes dx through unchanged
    dh, g["mlp.W1"], g["mlp.b1"], g["mlp.W2"], g["mlp.b2"] = L.mlp_backward(dx, c_mlp)
    # 3. h2 = ln2(x_mid)
    dmid, g["ln2.g"], g["ln2.b"] = L.layernorm_backward(dh, c_ln2)
    dx = dx + dmid
    # 2. x_mid = x + gma(conv(h1))
    dh, gg = gma_layer_backward(dx, c_gma)
    g.update({"gma." + name: value for name, value in gg.items()})
    if c_conv is not None:
        dh, g["conv.c"] = L.causal_conv_backward(dh, c_conv)
    # 1. h1 = ln1(x)
    dx_ln, g["ln1.g"], g["ln1.b"] = L.layernorm_backward(dh, c_ln1)
    return dx + dx_ln, g


def model_forward(params, idx, cfg):
    """logits (B, N, V) of the token ids idx (B, N), and the cache for model_backward."""
    B, N = idx.shape
    tok, c_tok = L.embedding_forward(idx, params["wte"])             # (B, N, D)
    pos, c_pos = L.position_forward(N, params["wpe"])                # (N, D)
    x = tok + pos
    c_blocks = []
    for l in range(cfg.n_layers):
        x, c = block_forward(x, _block_params(params, l), cfg)
        c_blocks.append(c)
    h, c_lnf = L.layernorm_forward(x, params["lnf.g"], params["lnf.b"])
    logits, c_head = L.linear_forward(h, _head_weight(params, cfg), None)   # (B, N, V)
    return logits, (c_tok, c_pos, c_blocks, c_lnf, c_head, cfg)


def model_backward(dlogits, cache):
    """Gradients of sum(logits * dlogits) for every parameter: a dict keyed like params."""
    c_tok, c_pos, c_blocks, c_lnf, c_head, cfg = cache
    g = {}
    # in the forward pass this was: logits = lnf(x) W_head
    dh, dW, _ = L.linear_backward(dlogits, c_head)
    dx, g["lnf.g"], g["lnf.b"] = L.layernorm_backward(dh, c_lnf)
    for l in reversed(range(cfg.n_layers)):
        dx, gb = block_backward(dx, c_blocks[l])
        g.update({f"h{l}.{name}": value for name, value in gb.items()})
    # in the forward pass this was: x = wte[idx] + wpe[:N]
    g["wpe"] = L.position_backward(dx, c_pos)
    g["wte"] = L.embedding_backward(dx, c_tok)
    if cfg.tie_embeddings:
        g["wte"] += dW.T
    else:
        g["head"] = dW
    return g


def lm_loss_forward(params, idx, targets, cfg):
    """Mean next-byte cross-entropy in nats: idx, targets (B, N) -> (loss, cache)."""
    logits, c_model = model_forward(params, idx, cfg)
    loss, c_ce = L.cross_entropy_forward(logits, targets)
    return loss, (c_model, c_ce)


def lm_loss_backward(cache, dloss=1.0):
    """Gradients of dloss * loss for every parameter."""
    c_model, c_ce = cache
    return model_backward(L.cross_entropy_backward(dloss, c_ce), c_model)


@dataclass
class DecodeState:
    """The recurrent state of the whole model after a prefix: one GMAState per layer,
    the convolution's last conv_width - 1 inputs per layer, and the number of tokens
    consumed (the next token's position). Its size does not depend on the position."""
    layers: list          # L gma_np.GMAState, each S (B, H, K, e), z (B, H, K) float64
    conv: list            # L arrays (B, conv_width - 1, D), or None before the first token
    position: int


class GMALanguageModel:
    """A config, its parameter dict, and the methods that use both.

        model = GMALanguageModel(ModelConfig(), seed=0)
        model.init_mixtures(first_batch_ids)                  # data-dependent mixture init
        loss, grads = model.loss_and_grads(idx, targets)
        state = model.decode_init(batch_size)
        logits, state = model.decode(tokens, state)           # (B, n) -> (B, n, V)
    """

    def __init__(self, cfg, params=None, seed=0):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.params = init_params(cfg, np.random.default_rng(seed)) if params is None else params
        expected = parameter_shapes(cfg)
        if set(self.params) != set(expected):
            raise ValueError(f"params: expected the names of parameter_shapes(cfg); missing "
                             f"{sorted(set(expected) - set(self.params))}, unexpected "
                             f"{sorted(set(self.params) - set(expected))}")
        for name, shape in expected.items():
            if tuple(self.params[name].shape) != shape:
                raise ValueError(f"params[{name!r}]: expected shape {shape}, got {self.params[name].shape}")

    def config_dict(self):
        return asdict(self.cfg)

    def n_params(self):
        return int(sum(v.size for v in self.params.values()))

    def _check_ids(self, idx, name="idx"):
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integer token ids, got dtype {idx.dtype}")
        if idx.ndim != 2:
            raise ValueError(f"{name}: expected shape (B, N), got {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            raise ValueError(f"{name}: expected ids in [0, {self.cfg.vocab_size}), "
                             f"got range [{idx.min()}, {idx.max()}]")
        return idx

    def forward(self, idx):
        return model_forward(self.params, self._check_ids(idx), self.cfg)

    def loss_and_grads(self, idx, targets):
        """(mean cross-entropy in nats, gradient dict) on one batch."""
        loss, cache = lm_loss_forward(self.params, self._check_ids(idx),
                                      self._check_ids(targets, "targets"), self.cfg)
        return loss, lm_loss_backward(cache)

    def loss(self, idx, targets):
        return lm_loss_forward(self.params, self._check_ids(idx),
                               self._check_ids(targets, "targets"), self.cfg)[0]

    def init_mixtures(self, idx, rng=None):
        """Fit every layer's mixture to the keys it projects from the batch idx (B, N),
        layer by layer (layer l sees the output of the already-initialised layers < l).
        See gma_np.nn.mixture_init."""
        cfg = self.cfg
        rng = np.random.default_rng(0) if rng is None else rng
        idx = self._check_ids(idx)
        x = self.params["wte"][idx] + self.params["wpe"][:idx.shape[1]]
        for l in range(cfg.n_layers):
            bp = _block_params(self.params, l)
            h, _ = L.layernorm_forward(x, bp["ln1.g"], bp["ln1.b"])
            if cfg.conv_width:
                h, _ = L.causal_conv_forward(h, bp["conv.c"])
            keys = project_keys(h, _gma_params(bp), cfg.n_heads)                    # (B, H, N, d)
            means, log_var, logits = fit_mixture(keys, cfg.n_components, rng, cfg.covariance)
            dtype = np.dtype(cfg.dtype)
            self.params[f"h{l}.gma.means"] = means.astype(dtype)
            self.params[f"h{l}.gma.log_var"] = log_var.astype(dtype)
            self.params[f"h{l}.gma.logits"] = logits.astype(dtype)
            x, _ = block_forward(x, _block_params(self.params, l), cfg)

    # ------------------------------------------------------------ recurrent decoding

    def decode_init(self, batch_size=1):
        """The empty state: nothing read yet, next position 0."""
        return DecodeState(layers=[None] * self.cfg.n_layers, conv=[None] * self.cfg.n_layers,
                           position=0)

    def decode(self, tokens, state):
        """Logits (B, n, V) of a chunk of tokens (B, n) continuing from `state`, and the
        new state. Any chunking (one prompt at once, then one token at a time) gives the
        same logits as model_forward on the whole sequence, up to max_len positions."""
        cfg, p = self.cfg, self.params
        tokens = self._check_ids(tokens, "tokens")
        B, n = tokens.shape
        positions = np.minimum(state.position + np.arange(n), cfg.max_len - 1)   # clamped
        x = p["wte"][tokens] + p["wpe"][positions]                               # (B, n, D)
        new_layers, new_conv = [], []
        for l in range(cfg.n_layers):
            bp = _block_params(p, l)
            h, _ = L.layernorm_forward(x, bp["ln1.g"], bp["ln1.b"])
            history = None
            if cfg.conv_width:
                w = cfg.conv_width
                history = (np.zeros((B, w - 1, cfg.d_model), dtype=h.dtype) if state.conv[l] is None
                           else state.conv[l])
                joined = np.concatenate([history, h], axis=1)                    # (B, w-1+n, D)
                h, _ = L.causal_conv_forward(h, bp["conv.c"], history)
                history = joined[:, joined.shape[1] - (w - 1):]
            new_conv.append(history)
            a, s = gma_layer_chunk(h, _gma_params(bp), state.layers[l], n_heads=cfg.n_heads,
                                   norm=cfg.norm)
            new_layers.append(s)
            x = x + a
            h, _ = L.layernorm_forward(x, bp["ln2.g"], bp["ln2.b"])
            x = x + L.mlp_forward(h, bp["mlp.W1"], bp["mlp.b1"], bp["mlp.W2"], bp["mlp.b2"])[0]
        h, _ = L.layernorm_forward(x, p["lnf.g"], p["lnf.b"])
        logits = h @ _head_weight(p, cfg)                                         # (B, n, V)
        return logits, DecodeState(layers=new_layers, conv=new_conv, position=state.position + n)
