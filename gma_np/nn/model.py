"""A model over any registered sequence mixer: a body shared by every task, and a head.

Dimension legend: B batch, N tokens, D d_model, V vocabulary, L layers, F = mlp_ratio * D.

    body:  x = wte[idx] + wpe[0..N-1]                           (B, N, D)
           for each of the L blocks (pre-norm residual):
               x = x + mixer(conv(layernorm(x)))                sequence mixing, causal or not
               x = x + mlp(layernorm(x))                        gelu MLP, D -> F -> D
           h = layernorm(x)                                     (B, N, D)
    head:  logits = h W_head                                    token head (B, N, V); W_head = wte^T when tied
           or pool(h) W + b                                     pooled classifier (B, C)

`body_forward(params, idx, cfg, *, causal, key_mask)` / `body_backward` are the body;
a head is an object of gma_np.nn.heads (TokenHead by default: the language model).
The body runs causally (language modelling, recall, copying) or bidirectionally with a
key padding mask (classification); the mixer gets both through the contract.
`model_forward` / `model_backward` are the body and the token head's logits: the
language model, as it has always been.

The mixer is cfg.mixer, one of gma_np.mixers.REGISTRY (GMA by default: the layer of
docs/definition.md, section 6), called only through the contract gma_np.mixers.contract.Mixer.
conv is an optional short depthwise causal convolution (width conv_width, identity at
initialisation; conv_width = 0 leaves it out). It hands each token its few
predecessors, which a GMA memory, a position-free average over routed slots, cannot
single out (docs/training.md, "Why a short convolution").

The parameters live in one flat dict name -> array (the names of `parameter_shapes`:
"h{l}.{mixer}.{name}" for a mixer's own, then the head's: "head" for an untied token
head, "cls.W", "cls.b" for the classifier), which is what the optimizer, the
checkpoints and gma_np.gradcheck see; a mixer's untrained buffers (performer's random
projections) live in a second dict of the same form (`buffer_shapes`).
`model_forward` / `model_backward` are the pure functional pair over both;
`LanguageModel` holds a config and the dicts.

ONE block function, `block_forward`, serves training (with a cache for
block_backward), recurrent decoding (with a BlockState) and the data-dependent
initialisation (with a hook that sets the mixer's parameters from its input).
The initialisation hands the hook the real tokens only (key_mask True) of the first
batch, as one row (1, M, D): GMA's mixture is fitted to the keys of real tokens, never
to padding. A mixer's init_from_data therefore treats its input as a bag of tokens
(GMA's projects each token's key on its own).

Decode (token heads only; docs/training.md, "Sampling"): per layer the mixer's recurrent state plus
the convolution's history, and one position index shared by the layers. Past the
positional table (position >= max_len) the index is clamped to max_len - 1: every
later token gets the last learned position, while the mixer keeps reading the whole
prefix. tests/test_nn.py checks decode == full causal forward within max_len. This decode is
the reference of the fused one (gma_np.nn.decode.FastDecoder: one Numba call per token for
the whole model), which `gma-np sample` runs.
"""

from dataclasses import asdict, dataclass

import numpy as np

from gma_np.mixers import MIXER_NAMES, get_mixer
from gma_np.nn import layers as L
from gma_np.nn.heads import TokenHead
from gma_np.nn.layers import INIT_STD

# Positional embeddings start smaller than token embeddings (GPT-2 uses 0.01).
POS_INIT_STD = 0.01

# Block parameters with ndim >= 2 that are not weight-decayed: the convolution taps
# start as the identity tap, and decay would pull it to 0 for no reason.
BLOCK_NO_DECAY = ("conv.c",)


@dataclass
class ModelConfig:
    """Shape of a language model. Every default is the `tiny` training preset's."""
    vocab_size: int = 256          # V: bytes
    max_len: int = 128             # rows of the positional table (training context)
    d_model: int = 128             # D: width of the residual stream
    n_layers: int = 2              # L: pre-norm blocks
    mixer: str = "gma"             # the sequence mixer: a name of gma_np.mixers.REGISTRY
    n_heads: int = 4               # H: heads per layer
    head_dim: int = 32             # d: query/key size per head (H*d need not equal D)
    value_dim: int = 32            # e: value size per head
    n_components: int = 16         # gma: K mixture components (memory slots) per head
    covariance: str = "diag"       # gma: "diag" (H, K, d) or "spherical" (H, K) log-variances
    learn_temperature: bool = True # gma: a learned log-temperature per head (H,)
    norm: str = "row"              # gma: read-out normalisation, "row" or "slot"
    n_features: int = 64           # performer: m random features per head
    feature_redraw: int = 0        # performer: redraw the projections every n steps (0 = never)
    ssm_expand: int = 2            # mamba: E, inner width E * D
    ssm_state: int = 16            # mamba: state size per channel
    ssm_conv: int = 4              # mamba: width of its causal depthwise convolution
    mlp_ratio: int = 4             # F = mlp_ratio * D
    conv_width: int = 4            # width of the causal convolution before each mixer (0 = none)
    tie_embeddings: bool = True    # logits = layernorm(x) wte^T (no separate head)
    dtype: str = "float32"         # compute dtype of parameters and activations

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "head_dim",
                     "value_dim", "n_components", "n_features", "ssm_expand", "ssm_state",
                     "ssm_conv", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("conv_width", "feature_redraw"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        if self.mixer not in MIXER_NAMES:
            raise ValueError(f"mixer: expected one of {MIXER_NAMES}, got {self.mixer!r}")
        if self.covariance not in ("diag", "spherical"):
            raise ValueError(f"covariance: expected 'diag' or 'spherical', got {self.covariance!r}")
        if self.norm not in ("row", "slot"):
            raise ValueError(f"norm: expected 'row' or 'slot', got {self.norm!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {self.dtype!r}")


def _block_shapes(cfg, l, mixer_shapes):
    """Block l's parameters, in a fixed order: ln1, conv, the mixer's, ln2, mlp."""
    D, F = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    b = f"h{l}."
    shapes = {b + "ln1.g": (D,), b + "ln1.b": (D,)}
    if cfg.conv_width:
        shapes[b + "conv.c"] = (cfg.conv_width, D)
    shapes.update({f"{b}{cfg.mixer}.{name}": shape for name, shape in mixer_shapes.items()})
    shapes.update({b + "ln2.g": (D,), b + "ln2.b": (D,),
                   b + "mlp.W1": (D, F), b + "mlp.b1": (F,),
                   b + "mlp.W2": (F, D), b + "mlp.b2": (D,)})
    return shapes


def _head_or_default(head):
    """The head of a model: the language model's token head unless one is given."""
    return TokenHead() if head is None else head


def body_shapes(cfg):
    """The body's parameters (embeddings, blocks, final layernorm), in a fixed order."""
    D = cfg.d_model
    mixer_shapes = get_mixer(cfg.mixer).parameter_shapes(cfg)
    shapes = {"wte": (cfg.vocab_size, D), "wpe": (cfg.max_len, D)}
    for l in range(cfg.n_layers):
        shapes.update(_block_shapes(cfg, l, mixer_shapes))
    shapes.update({"lnf.g": (D,), "lnf.b": (D,)})
    return shapes


def parameter_shapes(cfg, head=None):
    """Every trained parameter's name and shape, in a fixed order: the body's, then the
    head's (head None: the token head, which owns "head" (D, V) when untied)."""
    return {**body_shapes(cfg), **_head_or_default(head).shapes(cfg)}


def buffer_shapes(cfg):
    """Every untrained buffer's name and shape ({} for most mixers)."""
    mixer_buffers = get_mixer(cfg.mixer).buffer_shapes(cfg)
    return {f"h{l}.{cfg.mixer}.{name}": shape
            for l in range(cfg.n_layers) for name, shape in mixer_buffers.items()}


def decays(name, cfg, shape=None):
    """Whether AdamW decays parameter `name`: the rule of gma_np.mixers.contract (ndim >= 2,
    unless the mixer or the block names it as a non-weight). Embeddings and the heads'
    matrices are decayed; norm gains and biases have ndim 1 and are not. shape: the
    parameter's (None: looked up among the language model's parameters)."""
    shape = parameter_shapes(cfg)[name] if shape is None else shape
    local = name.split(".", 1)[1] if name.startswith("h") and "." in name else name
    if local.startswith(cfg.mixer + "."):
        return get_mixer(cfg.mixer).decays(local[len(cfg.mixer) + 1:], shape)
    return len(shape) >= 2 and local not in BLOCK_NO_DECAY


def init_params(cfg, rng, head=None):
    """Random initial parameters (dict of arrays in cfg.dtype): the body's, then the head's
    drawn from the same rng. A mixer with init_from_data (GMA's mixtures) gets
    placeholders here; LanguageModel.init_from_data sets them from the first batch."""
    dtype = np.dtype(cfg.dtype)
    mixer = get_mixer(cfg.mixer)
    resid_std = INIT_STD / np.sqrt(2 * cfg.n_layers)
    params = {"wte": rng.normal(0.0, INIT_STD, (cfg.vocab_size, cfg.d_model)),
              "wpe": rng.normal(0.0, POS_INIT_STD, (cfg.max_len, cfg.d_model))}
    for l in range(cfg.n_layers):
        b = f"h{l}."
        for name, shape in _block_shapes(cfg, l, {}).items():
            local = name[len(b):]
            if local == "mlp.W1":
                value = rng.normal(0.0, INIT_STD, shape)
            elif local == "mlp.W2":              # output projection of a residual branch
                value = rng.normal(0.0, resid_std, shape)
            elif local == "ln1.g" or local == "ln2.g":
                value = np.ones(shape)
            elif local == "conv.c":              # the convolution starts as the identity
                value = np.zeros(shape)
                value[0] = 1.0
            else:                                # biases
                value = np.zeros(shape)
            params[name] = value
            if local == ("conv.c" if cfg.conv_width else "ln1.b"):   # the mixer comes next
                params.update({f"{b}{cfg.mixer}.{n}": v
                               for n, v in mixer.init_parameters(cfg, rng).items()})
    params.update({"lnf.g": np.ones(cfg.d_model), "lnf.b": np.zeros(cfg.d_model)})
    head = _head_or_default(head)
    params.update(head.init(cfg, rng))
    order = parameter_shapes(cfg, head)
    return {name: params[name].astype(dtype) for name in order}


def init_buffers(cfg, rng):
    """The mixer's buffers of every layer (dict of arrays in cfg.dtype)."""
    mixer, dtype = get_mixer(cfg.mixer), np.dtype(cfg.dtype)
    out = {}
    for l in range(cfg.n_layers):
        out.update({f"h{l}.{cfg.mixer}.{n}": v.astype(dtype)
                    for n, v in mixer.init_buffers(cfg, rng).items()})
    return out


def _block_params(params, l):
    """The parameters (and buffers) of block l, keyed without the "h{l}." prefix."""
    prefix = f"h{l}."
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def _mixer_params(bp, cfg):
    """The mixer's arrays of a block, keyed by their local names."""
    prefix = cfg.mixer + "."
    return {name[len(prefix):]: value for name, value in bp.items() if name.startswith(prefix)}


def _head_weight(params, cfg):
    return TokenHead().weight(params, cfg)                                 # (D, V)


@dataclass
class BlockState:
    """What one block carries from a prefix to the next chunk while decoding."""
    mixer: object         # the mixer's recurrent state (its decode_init / decode)
    conv: np.ndarray      # (B, conv_width - 1, D): the convolution's last inputs, or None


def block_forward(x, bp, cfg, state=None, set_mixer=None, *, causal=True, key_mask=None):
    """One pre-norm block: x + mixer(conv(ln1(x))), then + mlp(ln2(.)). x (B, N, D).

    The one block function of the model, in three uses:
      training:        block_forward(x, bp, cfg, causal=..., key_mask=...) -> (x_out, cache
                       for block_backward); the mixer mixes causally or bidirectionally,
                       key_mask (B, N) bool (True = a real token) keeps padding out of it
      decoding:        block_forward(x, bp, cfg, state) -> (x_out, the BlockState after x),
                       x (B, n, D) the chunk that continues the state's prefix (causal)
      initialisation:  set_mixer(h, mixer_params) -> {local name: array} is called with the
                       mixer's input h before it runs; what it returns replaces those
                       parameters in bp (in place) and in this pass
    The convolution is causal in every use: it hands each token its predecessors, and
    padding sits at the end of a row, so no real token reads a padding one through it.
    """
    mixer = get_mixer(cfg.mixer)
    mp = _mixer_params(bp, cfg)
    decoding = state is not None
    if decoding and (causal is not True or key_mask is not None):
        raise ValueError("state: decoding is causal and without padding; got "
                         f"causal={causal!r}, key_mask {'given' if key_mask is not None else None}")
    # 1. h1 = conv(ln1(x))
    h, c_ln1 = L.layernorm_forward(x, bp["ln1.g"], bp["ln1.b"])
    c_conv, history = None, None
    if cfg.conv_width:
        h, c_conv = L.causal_conv_forward(h, bp["conv.c"], state.conv if decoding else None)
        xp = c_conv[0]                                               # (B, w-1+N, D) padded input
        history = xp[:, xp.shape[1] - (cfg.conv_width - 1):]
    if set_mixer is not None:
        for name, value in set_mixer(h, mp).items():
            mp[name] = value.astype(mp[name].dtype)
            bp[f"{cfg.mixer}.{name}"] = mp[name]
    # 2. x_mid = x + mixer(h1)
    if decoding:
        a, mixer_state = mixer.decode(h, mp, cfg, state.mixer)
    else:
        a, c_mix = mixer.forward(h, mp, cfg, causal=causal, key_mask=key_mask)
    x = x + a
    # 3, 4. x_out = x_mid + mlp(ln2(x_mid))
    h, c_ln2 = L.layernorm_forward(x, bp["ln2.g"], bp["ln2.b"])
    m, c_mlp = L.mlp_forward(h, bp["mlp.W1"], bp["mlp.b1"], bp["mlp.W2"], bp["mlp.b2"])
    if decoding:
        return x + m, BlockState(mixer=mixer_state, conv=history)
    return x + m, (c_ln1, c_conv, c_mix, c_ln2, c_mlp, mixer, cfg.mixer)


def block_backward(dx, cache):
    """(dx, grads keyed like the block's parameters without prefix) of block_forward."""
    c_ln1, c_conv, c_mix, c_ln2, c_mlp, mixer, mixer_name = cache
    g = {}
    # 4. x_out = x_mid + mlp(h2): the residual passes dx through unchanged
    dh, g["mlp.W1"], g["mlp.b1"], g["mlp.W2"], g["mlp.b2"] = L.mlp_backward(dx, c_mlp)
    # 3. h2 = ln2(x_mid)
    dmid, g["ln2.g"], g["ln2.b"] = L.layernorm_backward(dh, c_ln2)
    dx = dx + dmid
    # 2. x_mid = x + mixer(h1)
    dh, gm = mixer.backward(dx, c_mix)
    g.update({f"{mixer_name}.{name}": value for name, value in gm.items()})
    if c_conv is not None:
        # 1b. h1 = conv(ln1(x))
        dh, g["conv.c"] = L.causal_conv_backward(dh, c_conv)
    # 1a. ln1(x)
    dx_ln, g["ln1.g"], g["ln1.b"] = L.layernorm_backward(dh, c_ln1)
    return dx + dx_ln, g


def body_forward(params, idx, cfg, *, causal=True, key_mask=None):
    """The body's last hidden states h (B, N, D) of the token ids idx (B, N), and the cache
    for body_backward. params holds the parameters and the buffers (model docstring);
    causal and key_mask (B, N) bool or None go to every block's mixer."""
    B, N = idx.shape
    # 1. x = wte[idx] + wpe[:N]
    tok, c_tok = L.embedding_forward(idx, params["wte"])             # (B, N, D)
    pos, c_pos = L.position_forward(N, params["wpe"])                # (N, D)
    x = tok + pos
    # 2. the blocks
    c_blocks = []
    for l in range(cfg.n_layers):
        x, c = block_forward(x, _block_params(params, l), cfg, causal=causal, key_mask=key_mask)
        c_blocks.append(c)
    # 3. h = lnf(x)
    h, c_lnf = L.layernorm_forward(x, params["lnf.g"], params["lnf.b"])
    return h, (c_tok, c_pos, c_blocks, c_lnf, cfg)


def body_backward(dh, cache):
    """Gradients of sum(h * dh) for every body parameter (no buffers: they are not trained),
    in a fixed order: lnf, the blocks from the last, wpe, wte."""
    c_tok, c_pos, c_blocks, c_lnf, cfg = cache
    g = {}
    # 3. in the forward pass this was: h = lnf(x)
    dx, g["lnf.g"], g["lnf.b"] = L.layernorm_backward(dh, c_lnf)
    # 2. the blocks, from the last
    for l in reversed(range(cfg.n_layers)):
        dx, gb = block_backward(dx, c_blocks[l])
        g.update({f"h{l}.{name}": value for name, value in gb.items()})
    # 1. in the forward pass this was: x = wte[idx] + wpe[:N]
    g["wpe"] = L.position_backward(dx, c_pos)
    g["wte"] = L.embedding_backward(dx, c_tok)
    return g


def model_forward(params, idx, cfg):
    """The language model: logits (B, N, V) of the token ids idx (B, N) (the causal body and
    the token head's logits), and the cache for model_backward."""
    h, c_body = body_forward(params, idx, cfg)
    logits, c_head = L.linear_forward(h, _head_weight(params, cfg), None)   # (B, N, V)
    return logits, (c_body, c_head, cfg)


def model_backward(dlogits, cache):
    """Gradients of sum(logits * dlogits) for every parameter: a dict keyed like params
    (no buffers: they are not trained)."""
    c_body, c_head, cfg = cache
    # in the forward pass this was: logits = h W_head
    dh, dW, _ = L.linear_backward(dlogits, c_head)
    g = body_backward(dh, c_body)
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
    """The recurrent state of the whole model after a prefix: one BlockState per layer
    (the mixer's state, the convolution's last conv_width - 1 inputs) and the number of
    tokens consumed (the next token's position). For GMA, linear and performer its size
    does not depend on the position; softmax attention's key/value cache grows with it."""
    blocks: list          # L BlockState
    position: int


class LanguageModel:
    """A config, its head, its parameter and buffer dicts, and the methods that use them.

        model = LanguageModel(ModelConfig(mixer="gma"), seed=0)
        model.init_from_data(first_batch_ids)                 # e.g. GMA's mixture fit
        loss, grads = model.loss_and_grads(idx, targets)
        state = model.decode_init(batch_size)
        logits, state = model.decode(tokens, state)           # (B, n) -> (B, n, V)

    With another head (a task's, e.g. gma_np.nn.heads.PooledClassifierHead) the
    parameters are the body's plus that head's; `body(tokens, key_mask, causal)` gives
    the body's states, and the head turns them into a loss (gma_np.train.loop). The
    token-logit methods (forward, loss_and_grads, decode) need a token head.
    """

    def __init__(self, cfg, params=None, seed=0, buffers=None, head=None):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.head = _head_or_default(head)
        rng = np.random.default_rng(seed)
        self.params = init_params(cfg, rng, self.head) if params is None else params
        self.buffers = init_buffers(cfg, rng) if buffers is None else buffers
        for what, given, expected in (("params", self.params, parameter_shapes(cfg, self.head)),
                                      ("buffers", self.buffers, buffer_shapes(cfg))):
            if set(given) != set(expected):
                raise ValueError(f"{what}: expected the names of {what[:-1]}_shapes(cfg) "
                                 f"(mixer {cfg.mixer!r}); missing {sorted(set(expected) - set(given))}, "
                                 f"unexpected {sorted(set(given) - set(expected))}")
            for name, shape in expected.items():
                if tuple(given[name].shape) != shape:
                    raise ValueError(f"{what}[{name!r}]: expected shape {shape}, got {given[name].shape}")

    @property
    def mixer(self):
        return get_mixer(self.cfg.mixer)

    def arrays(self):
        """Parameters and buffers in one dict: what model_forward reads."""
        return {**self.params, **self.buffers} if self.buffers else self.params

    def config_dict(self):
        return asdict(self.cfg)

    def n_params(self):
        """Trained parameters (buffers not counted)."""
        return int(sum(v.size for v in self.params.values()))

    def decay_flags(self):
        """{name: whether AdamW decays it} for every parameter (gma_np.nn.model.decays)."""
        return {name: decays(name, self.cfg, value.shape) for name, value in self.params.items()}

    def _require_token_head(self, what):
        if getattr(self.head, "kind", None) != "token":
            raise ValueError(f"{what}: needs a token head (logits over the vocabulary); this "
                             f"model's head is a {type(self.head).__name__}")

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

    def _check_mask(self, key_mask, idx):
        if key_mask is None:
            return None
        key_mask = np.asarray(key_mask)
        if key_mask.dtype != np.bool_ or key_mask.shape != idx.shape:
            raise ValueError(f"key_mask: expected a bool array of shape {idx.shape} or None, "
                             f"got dtype {key_mask.dtype} and shape {key_mask.shape}")
        return key_mask

    def body(self, tokens, key_mask=None, causal=True):
        """The body's last hidden states h (B, N, D) of tokens (B, N)."""
        tokens = self._check_ids(tokens, "tokens")
        return body_forward(self.arrays(), tokens, self.cfg, causal=causal,
                            key_mask=self._check_mask(key_mask, tokens))[0]

    def forward(self, idx):
        self._require_token_head("forward")
        return model_forward(self.arrays(), self._check_ids(idx), self.cfg)

    def loss_and_grads(self, idx, targets):
        """(mean cross-entropy in nats, gradient dict) on one batch."""
        self._require_token_head("loss_and_grads")
        loss, cache = lm_loss_forward(self.arrays(), self._check_ids(idx),
                                      self._check_ids(targets, "targets"), self.cfg)
        return loss, lm_loss_backward(cache)

    def loss(self, idx, targets):
        self._require_token_head("loss")
        return lm_loss_forward(self.arrays(), self._check_ids(idx),
                               self._check_ids(targets, "targets"), self.cfg)[0]

    def init_from_data(self, idx, rng=None, *, causal=True, key_mask=None):
        """Set the parameters a mixer initialises from data (GMA: every layer's mixture
        fitted to the keys it projects from the batch idx (B, N)), layer by layer: layer l
        sees the output of the already-initialised layers < l, run as training runs them
        (causal, key_mask). Only the real tokens (key_mask True) reach the mixer's fit, as
        one row (1, M, D): padding never shapes the mixture. Nothing for a mixer without
        init_from_data."""
        cfg, mixer = self.cfg, self.mixer
        if mixer.init_from_data is None:
            return
        rng = np.random.default_rng(0) if rng is None else rng
        idx = self._check_ids(idx)
        key_mask = self._check_mask(key_mask, idx)
        if key_mask is not None and not key_mask.any():
            raise ValueError("key_mask: no real token in the batch, nothing to initialise from")

        def fit(h, mp):
            real = h if key_mask is None else h[key_mask][None]       # (B, N, D) or (1, M, D)
            return mixer.init_from_data(real, mp, cfg, rng)
        arrays = self.arrays()
        x = arrays["wte"][idx] + arrays["wpe"][:idx.shape[1]]
        for l in range(cfg.n_layers):
            bp = _block_params(arrays, l)
            x, _ = block_forward(x, bp, cfg, set_mixer=fit, causal=causal, key_mask=key_mask)
            for name in mixer.parameter_shapes(cfg):
                key = f"{cfg.mixer}.{name}"
                self.params[f"h{l}.{key}"] = bp[key]

    def redraw_buffers(self, rng):
        """Redraw every layer's buffers (performer's projections); False if the mixer has
        nothing to redraw."""
        cfg, mixer = self.cfg, self.mixer
        if mixer.redraw is None or not self.buffers:
            return False
        for l in range(cfg.n_layers):
            prefix = f"h{l}.{cfg.mixer}."
            mine = {n[len(prefix):]: v for n, v in self.buffers.items() if n.startswith(prefix)}
            for name, value in mixer.redraw(mine, cfg, rng).items():
                self.buffers[prefix + name] = value.astype(self.buffers[prefix + name].dtype)
        return True

    # ------------------------------------------------------------ recurrent decoding

    def decode_init(self, batch_size=1):
        """The empty state: nothing read yet, next position 0."""
        self._require_token_head("decode_init")
        cfg, mixer, arrays = self.cfg, self.mixer, self.arrays()
        blocks = []
        for l in range(cfg.n_layers):
            mp = _mixer_params(_block_params(arrays, l), cfg)
            conv = (np.zeros((batch_size, cfg.conv_width - 1, cfg.d_model), dtype=cfg.dtype)
                    if cfg.conv_width else None)
            blocks.append(BlockState(mixer=mixer.decode_init(batch_size, mp, cfg), conv=conv))
        return DecodeState(blocks=blocks, position=0)

    def decode(self, tokens, state):
        """Logits (B, n, V) of a chunk of tokens (B, n) continuing from `state`, and the
        new state. Any chunking (one prompt at once, then one token at a time) gives the
        same logits as model_forward on the whole sequence, up to max_len positions."""
        self._require_token_head("decode")
        cfg, p = self.cfg, self.arrays()
        tokens = self._check_ids(tokens, "tokens")
        if not isinstance(state, DecodeState):
            raise TypeError(f"state: expected a DecodeState from decode_init or decode, "
                            f"got {type(state).__name__}")
        B, n = tokens.shape
        positions = np.minimum(state.position + np.arange(n), cfg.max_len - 1)   # clamped
        x = p["wte"][tokens] + p["wpe"][positions]                               # (B, n, D)
        blocks = []
        for l in range(cfg.n_layers):
            x, s = block_forward(x, _block_params(p, l), cfg, state.blocks[l])
            blocks.append(s)
        h, _ = L.layernorm_forward(x, p["lnf.g"], p["lnf.b"])
        logits = h @ _head_weight(p, cfg)                                         # (B, n, V)
        return logits, DecodeState(blocks=blocks, position=state.position + n)
