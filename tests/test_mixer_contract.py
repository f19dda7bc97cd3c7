"""The mixer contract test: every registered mixer is proven the same way, at the layer level.

Parametrised over gma_np.mixers.REGISTRY, so a mixer is covered the day it is
registered. For each mixer, with its projections and its own parameters:

- fast forward vs its naive reference at odd sizes: float64 to RTOL[float64], float32
  inputs against the float64 reference to RTOL[float32] (relative to max |y|);
  causal and bidirectional, with and without a key mask (an all-padding sequence too);
- every gradient (x and every parameter) by gma_np.gradcheck in float64, full mode;
- exact causality: changing the tokens at or after t changes nothing before t, bit for bit;
- decoding token by token and in uneven chunks equals the causal forward;
- bad input gets a clear error naming the argument;
- the model takes the mixer: parameter names, weight-decay rule, loss gradients, decode.
Per-mixer core tests (tests/mixers/) prove the cores' own details.
"""

import numpy as np
import pytest

import gma_np
from gma_np.mixers import MIXER_NAMES, get_mixer
from gma_np.nn.model import LanguageModel, ModelConfig, decays

RTOL = {np.float64: 1e-12, np.float32: 2e-6}

# Finite-difference step of the contract's gradient check. Some feature maps are C^1 but
# not C^2 (linear attention's elu + 1 at 0): a 5-point stencil that straddles the kink is
# off by O(h), 1e-5 relative at the default h = 1e-3 for entries near 0. At h = 1e-5 a
# straddle is 100 times rarer and smaller, and the rounding floor of the stencil
# (eps_64 |f| / h ~ 2e-11 relative) is still far below the 1e-6 the check asks.
FD_STEP_KINKED = 1e-5

# odd sizes: B 2, N 7, D 5, H 2, d 3, e 2, K 3, m 4 random features
SMALL = dict(vocab_size=11, max_len=9, d_model=5, n_layers=1, n_heads=2, head_dim=3,
             value_dim=2, n_components=3, n_features=4, mlp_ratio=2, conv_width=2,
             dtype="float64")


def _cfg(name, **kw):
    return ModelConfig(**{**SMALL, "mixer": name, **kw})


def _params(mixer, cfg, seed=0, scale=0.5):
    """Parameters away from the symmetric initial point, and the buffers, float64."""
    rng = np.random.default_rng(seed)
    p = mixer.init_parameters(cfg, rng)
    p = {n: v + scale * rng.standard_normal(v.shape) for n, v in p.items()}
    return p, mixer.init_buffers(cfg, rng)


def _x(cfg, B=2, N=7, seed=1):
    return np.random.default_rng(seed).standard_normal((B, N, cfg.d_model))


def _mask(B, N):
    m = np.ones((B, N), dtype=bool)
    m[0, 2] = m[0, N - 2] = False
    m[1, :] = False                                   # an all-padding sequence
    return m


def _close(name, got, ref, rtol):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    scale = max(np.abs(ref).max(), 1e-300)
    err = np.abs(got - ref).max() / scale
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:g}"


def _modes(mixer):
    return [True] if mixer.causal_only else [True, False]


@pytest.fixture(params=MIXER_NAMES)
def name(request):
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_forward_matches_reference(name, dtype, masked):
    mixer, cfg = get_mixer(name), _cfg(name)
    p, buf = _params(mixer, cfg)
    x = _x(cfg)
    mask = _mask(*x.shape[:2]) if masked else None
    for causal in _modes(mixer):
        arrays = {n: v.astype(dtype) for n, v in {**p, **buf}.items()}
        y, _ = mixer.forward(x.astype(dtype), arrays, cfg, causal=causal, key_mask=mask)
        assert y.dtype == dtype, f"{name}: output dtype {y.dtype}, expected {dtype}"
        ref = mixer.reference(x, {**p, **buf}, cfg, causal=causal, key_mask=mask)
        _close(f"{name} causal={causal} y", y, ref, RTOL[dtype])


def test_gradients_full_gradcheck(name):
    mixer, cfg = get_mixer(name), _cfg(name)
    p, buf = _params(mixer, cfg)
    x = _x(cfg, B=2, N=5)
    mask = _mask(2, 5)
    mask[1, 3] = True                                 # the padded sequence has one real key
    for causal in _modes(mixer):
        for key_mask in (None, mask):
            def fun(x, **q):
                return mixer.forward(x, {**q, **buf}, cfg, causal=causal, key_mask=key_mask)[0]

            def grad(dy, x, **q):
                dx, g = mixer.backward(dy, mixer.forward(x, {**q, **buf}, cfg, causal=causal,
                                                         key_mask=key_mask)[1])
                return {"x": dx, **g}
            report = gma_np.gradcheck(fun, grad, {"x": x, **p}, mode="full", step=FD_STEP_KINKED)
            assert report.ok, f"{name} causal={causal} mask={key_mask is not None}\n{report}"
            checked = {c.name for c in report.inputs}
            assert checked == {"x", *p}, f"{name}: checked {sorted(checked)}, expected x and {sorted(p)}"


def test_exact_causality(name):
    mixer, cfg = get_mixer(name), _cfg(name)
    p, buf = _params(mixer, cfg)
    x = _x(cfg, N=9)
    y, _ = mixer.forward(x, {**p, **buf}, cfg, causal=True)
    rng = np.random.default_rng(7)
    for t in (0, 4, 8):
        x2 = x.copy()
        x2[:, t:] = 3.0 * rng.standard_normal(x2[:, t:].shape)
        y2, _ = mixer.forward(x2, {**p, **buf}, cfg, causal=True)
        assert np.array_equal(y2[:, :t], y[:, :t]), f"{name}: outputs before {t} changed"
        assert not np.array_equal(y2[:, t:], y[:, t:]), f"{name}: the change at {t} did nothing"


@pytest.mark.parametrize("chunks", [(1,) * 9, (4, 1, 3, 1)], ids=["tokens", "uneven"])
def test_decode_equals_causal_forward(name, chunks):
    mixer, cfg = get_mixer(name), _cfg(name)
    p, buf = _params(mixer, cfg)
    arrays = {**p, **buf}
    x = _x(cfg, N=sum(chunks))
    y, _ = mixer.forward(x, arrays, cfg, causal=True)
    state, outs, t = mixer.decode_init(x.shape[0], arrays, cfg), [], 0
    for n in chunks:
        out, state = mixer.decode(x[:, t:t + n], arrays, cfg, state)
        outs.append(out)
        t += n
    _close(f"{name} decode", np.concatenate(outs, axis=1), y, RTOL[np.float64])


def test_bad_input_names_the_argument(name):
    mixer, cfg = get_mixer(name), _cfg(name)
    p, buf = _params(mixer, cfg)
    arrays = {**p, **buf}
    x = _x(cfg)
    with pytest.raises(ValueError, match="^x: expected shape"):
        mixer.forward(x[:, :, :3], arrays, cfg, causal=True)
    bad = x.copy()
    bad[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="^x: expected finite values"):
        mixer.forward(bad, arrays, cfg, causal=True)
    with pytest.raises(TypeError, match="^x: expected dtype float32 or float64"):
        mixer.forward(x.astype(np.int64), arrays, cfg, causal=True)
    with pytest.raises(ValueError, match="key_mask: expected shape"):
        mixer.forward(x, arrays, cfg, causal=True, key_mask=np.ones((2, 3), dtype=bool))


def test_model_takes_the_mixer(name):
    """The model and its weight-decay rule through the contract: names, decay, gradients, decode."""
    cfg = _cfg(name)
    model = LanguageModel(cfg, seed=2)
    mixer = get_mixer(name)
    mine = [n for n in model.params if n.startswith(f"h0.{name}.")]
    assert sorted(n.split(".", 2)[2] for n in mine) == sorted(mixer.parameter_shapes(cfg))
    for n in mine:
        local = n.split(".", 2)[2]
        assert decays(n, cfg) == (model.params[n].ndim >= 2 and local not in mixer.no_decay), n
    assert decays("h0.mlp.W1", cfg) and not decays("h0.conv.c", cfg) and not decays("h0.ln1.g", cfg)
    rng = np.random.default_rng(3)
    for n in model.params:
        model.params[n] = model.params[n] + 0.3 * rng.standard_normal(model.params[n].shape)
    idx = rng.integers(0, cfg.vocab_size, (2, 8))

    def fun(**q):
        return LanguageModel(cfg, params=q, buffers=model.buffers).loss(idx[:, :-1], idx[:, 1:])

    def grad(dloss, **q):
        loss, g = LanguageModel(cfg, params=q, buffers=model.buffers).loss_and_grads(idx[:, :-1],
                                                                                      idx[:, 1:])
        return {n: dloss * v for n, v in g.items()}
    report = gma_np.gradcheck(fun, grad, dict(model.params), mode="random", n_directions=2)
    assert report.ok, f"{name}\n{report}"
    full, _ = model.forward(idx)
    state = model.decode_init(2)
    a, state = model.decode(idx[:, :5], state)
    b, state = model.decode(idx[:, 5:], state)
    _close(f"{name} model decode", np.concatenate([a, b], axis=1), full, 1e-10)
