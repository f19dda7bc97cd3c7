"""The fused decoding path: one Numba call per token for the whole model, for every mixer.

Dimension legend: B batch, n tokens of a chunk, L layers, D model width, F MLP width,
V vocabulary, H heads, d query/key head size, e value head size, K GMA components,
m performer features, C softmax cache capacity, M mamba channels, S mamba state size,
w convolution taps.

LanguageModel.decode (gma_np.nn.model) is the reference: the one block function of
training, layer by layer, over the library's checked layers and mixers. At one token
its cost is the calls, not the arithmetic (a few hundred thousand multiply-adds for
the tiny preset against some fifty NumPy calls, checks and parameter dicts per layer).
FastDecoder runs the same model with one kernel call per chunk of tokens, `_decode_<mixer>`,
whose loop does, per token and for every layer,

    x = wte[token] + wpe[min(position, max_len - 1)]
    h = conv(ln1(x))                                      history (B, L, w-1, D) float64
    a = mixer's one-token step(h)                         the mixer's state, in place
    x = x + a;  x = x + W2 gelu(W1 ln2(x) + b1) + b2
    logits = lnf(x) W_head

over arrays made once when the decoder is made: the parameters stacked per layer
(L, ...), in the model's dtype (a snapshot: a decoder made before the parameters change
keeps the old ones), and the state, float64. The mixers' one-token steps are theirs,
next to their other forms: GMA's routing, memory write and read-out
(gma_np.mixers.gma.recurrent._gma_token_step), linear attention's and FAVOR+'s running
sums (gma_np.mixers.linear.step, gma_np.mixers.performer.step), softmax attention's
key/value cache (gma_np.mixers.softmax.recurrent._softmax_token_step), the selective
scan's step (gma_np.mixers.mamba.step). This module is the one place of the model that
knows the mixers beyond the contract (gma_np.mixers.contract): a kernel that runs a
whole token must call the mixer's step inside Numba, which a Python-level contract
cannot offer.

Numerics: every activation, sum and state is float64 whatever the model's dtype; the
logits come back in the model's dtype, rounded once, as LanguageModel.decode returns
them. At float64 the decoder agrees with LanguageModel.decode and the training forward
to about 1e-13 relative; at float32 to float32 roundings (the reference rounds every
layer's output to float32, this path does not): tests/test_decode_fast.py.

Errors: a kernel that meets a non-finite value (or a failed range check of a mixer)
stops and reports it; the decoder then runs the reference over every token it has
consumed and the new chunk, which raises the reference's error, naming the cause, or
(for a rare legitimate case) computes it, and continues on the reference from there.
Parameters the fast path cannot take (a mixture or projections that do not validate)
send every call to the reference from the start.

Sampling: `pick_token` is gma_np.train.evaluate._pick with the same draws of the same
Generator (numpy's Generator.choice with p: the cumulative sum of p / sum(p), divided
by its last entry, searched for one uniform draw) and without choice's checks; `generate`
is gma_np.train.evaluate.generate over a FastDecoder.
"""

import numpy as np
from numba import njit

from gma_np._numerics import DEFAULT_EPS
from gma_np._validation import _finite_flat
from gma_np.mixers.gma.core import temperature_of
from gma_np.mixers.gma.recurrent import _gma_token_step
from gma_np.mixers.gma.recurrent import token_step_arrays as gma_arrays
from gma_np.mixers.linear.step import _linear_token_step
from gma_np.mixers.mamba.core import dims as mamba_dims
from gma_np.mixers.mamba.step import _mamba_token_step
from gma_np.mixers.mamba.step import token_step_arrays as mamba_arrays
from gma_np.mixers.performer.core import n_features
from gma_np.mixers.performer.step import _performer_token_step
from gma_np.mixers.performer.step import token_step_arrays as performer_arrays
from gma_np.mixers.softmax.recurrent import KV_INITIAL_CAPACITY, _softmax_token_step
from gma_np.nn._step_kernels import (
    _add_bias,
    _conv_step,
    _gelu,
    _layernorm,
    _matvec,
)
from gma_np.nn.layers import GELU_A, GELU_C, LAYERNORM_EPS
from gma_np.nn.model import LanguageModel, _block_params, _head_weight, _mixer_params


# ---------------------------------------------------------------- the pieces of a token

@njit(cache=True)
def _embed(token, position, emb, x):
    """x = wte[token] + wpe[position], the position clamped to the table's last row."""
    wte, wpe = emb[0], emb[1]
    pos = min(position, wpe.shape[0] - 1)
    for j in range(x.shape[0]):
        x[j] = np.float64(wte[token, j]) + np.float64(wpe[pos, j])


@njit(cache=True)
def _block_in(x, l, blocks, history, h):
    """h = conv(ln1(x)) of layer l; history (w-1, D) the layer's convolution inputs."""
    _layernorm(x, blocks[0][l], blocks[1][l], LAYERNORM_EPS, h)
    if blocks[2].shape[1] > 0:
        _conv_step(h, blocks[2][l], history)


@njit(cache=True)
def _block_out(x, a, l, blocks, h, f):
    """x = x + a, then x = x + mlp(ln2(x)) of layer l (h (D,), f (F,) scratch)."""
    for j in range(x.shape[0]):
        x[j] += a[j]
    _layernorm(x, blocks[3][l], blocks[4][l], LAYERNORM_EPS, h)
    _matvec(h, blocks[5][l], f)
    _add_bias(f, blocks[6][l])
    _gelu(f, GELU_C, GELU_A)
    _matvec(f, blocks[7][l], h)
    _add_bias(h, blocks[8][l])
    for j in range(x.shape[0]):
        x[j] += h[j]


@njit(cache=True)
def _project(h, l, shell, q, k, v):
    """q, k, v = h W + b of layer l's attention shell (heads side by side)."""
    _matvec(h, shell[0][l], q)
    _add_bias(q, shell[1][l])
    _matvec(h, shell[2][l], k)
    _add_bias(k, shell[3][l])
    _matvec(h, shell[4][l], v)
    _add_bias(v, shell[5][l])


@njit(cache=True)
def _project_out(o, l, shell, a):
    """a = concat_h(o_h) Wo + bo of layer l."""
    _matvec(o, shell[6][l], a)
    _add_bias(a, shell[7][l])


@njit(cache=True)
def _head(x, emb, h, row, logits):
    """logits = lnf(x) W_head, rounded to logits' dtype; False if a logit is not finite."""
    _layernorm(x, emb[2], emb[3], LAYERNORM_EPS, h)
    _matvec(h, emb[4], row)
    for j in range(row.shape[0]):
        logits[j] = row[j]
    return _finite_flat(row)


# ---------------------------------------------------------------- one kernel per mixer
# Each: tokens (B, n) int64, the position of tokens[:, 0], the packed parameters, the
# state (updated in place), logits (B, n, V) written. True when every token went
# through; False at the first non-finite value or failed check (the state is then
# partly updated, and the caller recomputes it: module docstring).
# The loops differ only in the mixer's one-token step, and are written out once per mixer
# on purpose: one loop taking the step as an argument, or built by a factory closing
# over it, is a cache miss for Numba in every new process (numba 0.68, measured), so
# each `gma-np sample` would compile the whole decode again before its first token.

@njit(cache=True)
def _buffers(emb, blocks, n_q, n_v):
    D = emb[0].shape[1]
    return (np.empty(D), np.empty(D), np.empty(D), np.empty(blocks[5].shape[2]),
            np.empty(n_q), np.empty(n_q), np.empty(n_v), np.empty(n_v), np.empty(emb[4].shape[1]))


@njit(cache=True, error_model="numpy")
def _decode_gma(tokens, position, emb, blocks, shell, core, state, logits):
    means_t, inv_var_t, const, tau, slot, eps = core
    history, S, z = state
    x, h, a, f, q, k, v, o, row = _buffers(emb, blocks, shell[0].shape[2], shell[4].shape[2])
    work = np.empty(4 * means_t.shape[3] + S.shape[4])
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            _embed(tokens[b, t], position + t, emb, x)
            for l in range(blocks[0].shape[0]):
                _block_in(x, l, blocks, history[b, l], h)
                _project(h, l, shell, q, k, v)
                if not _gma_token_step(q, k, v, means_t[l], inv_var_t[l], const[l], tau[l], slot,
                                       eps, S[b, l], z[b, l], o, work):
                    return False
                _project_out(o, l, shell, a)
                _block_out(x, a, l, blocks, h, f)
            if not _head(x, emb, h, row, logits[b, t]):
                return False
    return True


@njit(cache=True, error_model="numpy")
def _decode_linear(tokens, position, emb, blocks, shell, core, state, logits):
    (eps,) = core
    history, S, z = state
    x, h, a, f, q, k, v, o, row = _buffers(emb, blocks, shell[0].shape[2], shell[4].shape[2])
    work = np.empty(2 * S.shape[3] + S.shape[4])
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            _embed(tokens[b, t], position + t, emb, x)
            for l in range(blocks[0].shape[0]):
                _block_in(x, l, blocks, history[b, l], h)
                _project(h, l, shell, q, k, v)
                if not _linear_token_step(q, k, v, eps, S[b, l], z[b, l], o, work):
                    return False
                _project_out(o, l, shell, a)
                _block_out(x, a, l, blocks, h, f)
            if not _head(x, emb, h, row, logits[b, t]):
                return False
    return True


@njit(cache=True, error_model="numpy")
def _decode_performer(tokens, position, emb, blocks, shell, core, state, logits):
    W, consts = core
    history, S, z = state
    x, h, a, f, q, k, v, o, row = _buffers(emb, blocks, shell[0].shape[2], shell[4].shape[2])
    work = np.empty(2 * W.shape[2] + W.shape[3] + S.shape[4])
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            _embed(tokens[b, t], position + t, emb, x)
            for l in range(blocks[0].shape[0]):
                _block_in(x, l, blocks, history[b, l], h)
                _project(h, l, shell, q, k, v)
                if not _performer_token_step(q, k, v, W[l], consts[l], S[b, l], z[b, l], o, work):
                    return False
                _project_out(o, l, shell, a)
                _block_out(x, a, l, blocks, h, f)
            if not _head(x, emb, h, row, logits[b, t]):
                return False
    return True


@njit(cache=True, error_model="numpy")
def _decode_softmax(tokens, position, emb, blocks, shell, core, state, logits):
    (scale,) = core
    history, keys_t, values = state
    x, h, a, f, q, k, v, o, row = _buffers(emb, blocks, shell[0].shape[2], shell[4].shape[2])
    scores = np.empty(keys_t.shape[4])
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            _embed(tokens[b, t], position + t, emb, x)
            for l in range(blocks[0].shape[0]):
                _block_in(x, l, blocks, history[b, l], h)
                _project(h, l, shell, q, k, v)
                _softmax_token_step(q, k, v, scale, position + t, keys_t[b, l], values[b, l], o,
                                    scores)
                _project_out(o, l, shell, a)
                _block_out(x, a, l, blocks, h, f)
            if not _head(x, emb, h, row, logits[b, t]):
                return False
    return True


@njit(cache=True, error_model="numpy")
def _decode_mamba(tokens, position, emb, blocks, shell, core, state, logits):
    W_in, conv_w, conv_b, W_dt_down, W_dt_up, b_dt, W_B, W_C, A, D_skip, W_out = shell
    history, hs, conv_history = state
    M, S = A.shape[1], A.shape[2]
    x, h, a, f, _, _, _, _, row = _buffers(emb, blocks, 0, 0)
    work = np.empty(5 * M + W_dt_down.shape[2] + 2 * S)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            _embed(tokens[b, t], position + t, emb, x)
            for l in range(blocks[0].shape[0]):
                _block_in(x, l, blocks, history[b, l], h)
                p = (W_in[l], conv_w[l], conv_b[l], W_dt_down[l], W_dt_up[l], b_dt[l], W_B[l],
                     W_C[l], A[l], D_skip[l], W_out[l])
                _mamba_token_step(h, p, hs[b, l], conv_history[b, l], a, work)
                _block_out(x, a, l, blocks, h, f)
            if not _head(x, emb, h, row, logits[b, t]):
                return False
    return True


# ---------------------------------------------------------------- packing a model

def _stack(arrays):
    """(L, ...) C-ordered copy of one parameter of every layer."""
    return np.ascontiguousarray(np.stack(arrays))


def _pack_body(model):
    """emb = (wte, wpe, lnf.g, lnf.b, W_head (D, V)) and the blocks' (ln1.g, ln1.b, conv.c
    (L, w, D), or (L, 0, D) without a convolution, ln2.g, ln2.b, W1, b1, W2, b2), copies
    in the model's dtype; and each layer's mixer parameters by local name."""
    cfg, p = model.cfg, model.arrays()
    L, D = cfg.n_layers, cfg.d_model
    bps = [_block_params(p, l) for l in range(L)]
    conv = (_stack([bp["conv.c"] for bp in bps]) if cfg.conv_width
            else np.zeros((L, 0, D), dtype=cfg.dtype))
    blocks = tuple(conv if name == "conv.c" else _stack([bp[name] for bp in bps])
                   for name in ("ln1.g", "ln1.b", "conv.c", "ln2.g", "ln2.b",
                                "mlp.W1", "mlp.b1", "mlp.W2", "mlp.b2"))
    emb = (p["wte"].copy(), p["wpe"].copy(), p["lnf.g"].copy(), p["lnf.b"].copy(),
           np.ascontiguousarray(_head_weight(p, cfg)))
    return emb, blocks, [_mixer_params(bp, cfg) for bp in bps]


def _pack_shell(mps):
    return tuple(_stack([mp[name] for mp in mps])
                 for name in ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo"))


def _history(cfg, B):
    return np.zeros((B, cfg.n_layers, max(cfg.conv_width - 1, 0), cfg.d_model))


def _pack_gma(cfg, mps):
    per_layer = [gma_arrays(mp["means"], mp["log_var"], mp["logits"], temperature_of(mp))
                 for mp in mps]
    core = tuple(_stack(a) for a in zip(*per_layer)) + (cfg.norm == "slot", DEFAULT_EPS)
    H, K, e = cfg.n_heads, cfg.n_components, cfg.value_dim

    def new_state(B):
        L = cfg.n_layers
        return (_history(cfg, B), np.zeros((B, L, H, K, e)), np.zeros((B, L, H, K)))
    return _decode_gma, _pack_shell(mps), core, new_state


def _pack_linear(cfg, mps):
    H, d, e = cfg.n_heads, cfg.head_dim, cfg.value_dim

    def new_state(B):
        L = cfg.n_layers
        return (_history(cfg, B), np.zeros((B, L, H, d, e)), np.zeros((B, L, H, d)))
    return _decode_linear, _pack_shell(mps), (DEFAULT_EPS,), new_state


def _pack_performer(cfg, mps):
    per_layer = [performer_arrays(mp["projections"], DEFAULT_EPS) for mp in mps]
    core = tuple(_stack(a) for a in zip(*per_layer))
    H, m, e = cfg.n_heads, n_features(cfg), cfg.value_dim

    def new_state(B):
        L = cfg.n_layers
        return (_history(cfg, B), np.zeros((B, L, H, m, e)), np.zeros((B, L, H, m)))
    return _decode_performer, _pack_shell(mps), core, new_state


def _pack_softmax(cfg, mps):
    H, d, e = cfg.n_heads, cfg.head_dim, cfg.value_dim

    def new_state(B, capacity=KV_INITIAL_CAPACITY):
        L = cfg.n_layers
        return (_history(cfg, B), np.zeros((B, L, H, d, capacity)),
                np.zeros((B, L, H, capacity, e)))
    return _decode_softmax, _pack_shell(mps), (1.0 / np.sqrt(d),), new_state


def _pack_mamba(cfg, mps):
    per_layer = [mamba_arrays(mp) for mp in mps]
    params = tuple(_stack(a) for a in zip(*per_layer))
    _, M, S, _, W = mamba_dims(cfg)

    def new_state(B):
        L = cfg.n_layers
        return (_history(cfg, B), np.zeros((B, L, M, S)), np.zeros((B, L, W - 1, M)))
    return _decode_mamba, params, (), new_state


_PACKERS = {"gma": _pack_gma, "linear": _pack_linear, "performer": _pack_performer,
            "softmax": _pack_softmax, "mamba": _pack_mamba}


def _grow_cache(state, needed):
    """The softmax state with room for `needed` tokens: capacity doubled (or more)."""
    history, keys_t, values = state
    capacity = keys_t.shape[4]
    if needed <= capacity:
        return state
    grown = max(2 * capacity, 1 << (needed - 1).bit_length())
    new_keys = np.zeros(keys_t.shape[:4] + (grown,))
    new_values = np.zeros(values.shape[:3] + (grown, values.shape[4]))
    new_keys[..., :capacity] = keys_t
    new_values[:, :, :, :capacity] = values
    return history, new_keys, new_values


# ---------------------------------------------------------------- the decoder

class FastDecoder:
    """The fused decoding path of a LanguageModel with a token head (module docstring).

        decoder = FastDecoder(model, batch_size=1)
        logits = decoder.decode(prompt_ids)        # (B, n) -> (B, n, V), in the model's dtype
        logits = decoder.decode(next_ids)          # (B, 1) -> (B, 1, V), continuing
        decoder.position                           # tokens consumed; decoder.reset() starts over

    Any chunking gives LanguageModel.decode's logits of the same tokens (to rounding).
    The parameters are read when the decoder is made.
    """

    def __init__(self, model, batch_size=1):
        if not isinstance(model, LanguageModel):
            raise TypeError(f"model: expected a LanguageModel, got {type(model).__name__}")
        model._require_token_head("FastDecoder")
        if (isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer))
                or batch_size < 1):
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        self.model, self.cfg, self.batch_size = model, model.cfg, int(batch_size)
        emb, blocks, mps = _pack_body(model)
        try:
            kernel, shell, core, self._new_state = _PACKERS[self.cfg.mixer](self.cfg, mps)
            self._kernel, self._arguments = kernel, (emb, blocks, shell, core)
        except (TypeError, ValueError, FloatingPointError):
            self._kernel = None                   # the reference names the cause when it decodes
        self.reset()

    def reset(self):
        """Back to the empty prefix (position 0)."""
        self.position = 0
        self._consumed = []                       # the chunks decoded, for the checked path
        self._reference = None if self._kernel else self.model.decode_init(self.batch_size)
        self._state = self._new_state(self.batch_size) if self._kernel else None

    @property
    def uses_reference(self):
        """True once the decoder runs LanguageModel.decode (module docstring, "Errors")."""
        return self._kernel is None or self._reference is not None

    def _check_tokens(self, tokens):
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"tokens: expected integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim != 2 or tokens.shape[0] != self.batch_size or tokens.shape[1] < 1:
            raise ValueError(f"tokens: expected shape ({self.batch_size}, n) with n >= 1 (the "
                             f"decoder's batch_size), got {tokens.shape}")
        lo, hi = (int(tokens[0, 0]),) * 2 if tokens.size == 1 else (tokens.min(), tokens.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"tokens: expected ids in [0, {self.cfg.vocab_size}), got range "
                             f"[{lo}, {hi}]")
        return np.ascontiguousarray(tokens, dtype=np.int64)

    def decode(self, tokens):
        """Logits (B, n, V) in the model's dtype of tokens (B, n) after the tokens so far."""
        tokens = self._check_tokens(tokens)
        if self._state is None and self._reference is None:
            raise ValueError("decoder: an earlier decode failed; call reset() to start over")
        n = tokens.shape[1]
        if self._reference is not None:
            logits, self._reference = self.model.decode(tokens, self._reference)
        else:
            if self.cfg.mixer == "softmax":
                self._state = _grow_cache(self._state, self.position + n)
            logits = np.empty((self.batch_size, n, self.cfg.vocab_size), dtype=self.cfg.dtype)
            if not self._kernel(tokens, self.position, *self._arguments, self._state, logits):
                logits = self._checked_path(tokens)
        self._consumed.append(tokens)
        self.position += n
        return logits

    def _checked_path(self, tokens):
        """The reference over every token so far and this chunk: its error, or its logits
        of the chunk, and the decoder continues on the reference."""
        self._state = None                        # partly updated: unusable if this raises
        state = self.model.decode_init(self.batch_size)
        if self._consumed:
            _, state = self.model.decode(np.concatenate(self._consumed, axis=1), state)
        logits, self._reference = self.model.decode(tokens, state)
        return logits


# ---------------------------------------------------------------- sampling

@njit(cache=True)
def _draw(p, total, u):
    """The index numpy's Generator.choice(p.size, p=p / total) picks for the uniform draw
    u: the first i with cdf_i / cdf_last > u, cdf the running sum of p / total in order
    (np.cumsum's), so the same index bit for bit."""
    n = p.shape[0]
    cdf = np.empty(n)
    acc = 0.0
    for i in range(n):
        acc += p[i] / total
        cdf[i] = acc
    last = cdf[n - 1]
    for i in range(n):
        if cdf[i] / last > u:
            return i
    return n - 1                                   # u < 1 = cdf_last / cdf_last: not reached


@njit(cache=True)
def _shifted(logits, temperature, out):
    """out = z - max(z), z = logits / temperature: the operations of _pick's
    `z = logits / temperature` and `z - z.max()` (each exact-rounded, so the same bits)."""
    top = -np.inf
    for i in range(logits.shape[0]):
        z = logits[i] / temperature
        out[i] = z
        top = max(top, z)
    for i in range(logits.shape[0]):
        out[i] -= top


def pick_token(logits, temperature, top_k, rng):
    """One token id from logits (V,) float64: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) (restricted to the top_k likeliest when top_k > 0) with
    one rng.random(), the same id and the same Generator state as gma_np.train.evaluate's
    _pick (module docstring, "Sampling"). The exponentials and their sum are NumPy's, as
    there; ValueError if a logit is NaN or infinite (numpy's choice refuses those too)."""
    if temperature == 0:
        return int(np.argmax(logits))
    if top_k:
        z = logits / temperature
        cut = np.partition(z, -top_k)[-top_k] if top_k < z.size else -np.inf
        z = np.where(z >= cut, z, -np.inf)
        p = z - z.max()
    else:
        p = np.empty(logits.shape[0])
        _shifted(logits, float(temperature), p)
    np.exp(p, out=p)
    total = p.sum()
    if not total >= 1.0:                           # the largest entry alone is exp(0) = 1
        raise ValueError("logits: expected finite values, got NaN or infinite ones")
    return int(_draw(p, total, rng.random()))


def check_sampling(prompt, temperature, top_k):
    """The arguments of generate (this one and the reference's in gma_np.train.evaluate):
    TypeError / ValueError naming the one that cannot be used."""
    if not isinstance(prompt, (bytes, bytearray)):
        raise TypeError(f"prompt: expected bytes, got {type(prompt).__name__}")
    if temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0, got {top_k!r}")


def generate(model, prompt, n_tokens, *, temperature=0.8, top_k=0, rng=None):
    """prompt (bytes) followed by n_tokens sampled bytes, as bytes: gma_np.train.evaluate's
    generate (the prompt in one chunk, then one byte at a time; an empty prompt starts
    at a line break) over a FastDecoder."""
    check_sampling(prompt, temperature, top_k)
    rng = np.random.default_rng(0) if rng is None else rng
    prompt = bytes(prompt) or b"\n"
    decoder = FastDecoder(model, 1)
    logits = decoder.decode(np.frombuffer(prompt, dtype=np.uint8)[None, :].astype(np.int64))
    out = bytearray(prompt)
    last = logits[0, -1].astype(np.float64)                          # (V,)
    token = np.empty((1, 1), dtype=np.int64)
    for _ in range(n_tokens):
        token[0, 0] = pick_token(last, temperature, top_k, rng)
        out.append(int(token[0, 0]))
        logits = decoder.decode(token)
        last = logits[0, -1].astype(np.float64)
    return bytes(out)
