"""gma_np.nn: every layer's backward against central finite differences (float64), the whole
model's gradient, the decode path against the full forward, and the mixture initialisation."""

import numpy as np
import pytest

import gma_np
from gma_np.nn import LanguageModel, ModelConfig, lm_loss_backward, lm_loss_forward
from gma_np.nn import layers as L
from gma_np.mixers import get_mixer
from gma_np.mixers.attention import split_heads
from gma_np.mixers.gma.core import temperature_of
from gma_np.mixers.gma.init import DEAD_SHARE, component_shares
from gma_np.nn.model import block_backward, block_forward

# Decode vs full forward: the same float64 arithmetic in another order.
DECODE_ATOL = {np.float64: 1e-10, np.float32: 2e-4}


def _check(fun, grad, inputs, **kw):
    report = gma_np.gradcheck(fun, grad, inputs, **kw)
    assert report.ok, str(report)
    return report


# ---------------------------------------------------------------- single layers, every element

def test_embedding_gradcheck(rng):
    idx = np.array([[0, 3, 3, 1], [4, 0, 2, 3]])          # repeated ids: gradients must add up
    _check(lambda W: L.embedding_forward(idx, W)[0],
           lambda dout, W: {"W": L.embedding_backward(dout, L.embedding_forward(idx, W)[1])},
           {"W": rng.standard_normal((5, 3))}, mode="full")


def test_position_gradcheck(rng):
    _check(lambda W: np.broadcast_to(L.position_forward(4, W)[0], (2, 4, 3)).copy(),
           lambda dout, W: {"W": L.position_backward(dout, L.position_forward(4, W)[1])},
           {"W": rng.standard_normal((6, 3))}, mode="full")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_gradcheck(rng, bias):
    def grad(dout, x, W, b=None):
        dx, dW, db = L.linear_backward(dout, L.linear_forward(x, W, b)[1])
        return {"x": dx, "W": dW, **({"b": db} if bias else {})}
    inputs = {"x": rng.standard_normal((2, 5, 3)), "W": rng.standard_normal((3, 4))}
    if bias:
        inputs["b"] = rng.standard_normal(4)
    _check(lambda x, W, b=None: L.linear_forward(x, W, b)[0], grad, inputs, mode="full")


def test_layernorm_gradcheck(rng):
    def grad(dout, x, g, b):
        dx, dg, db = L.layernorm_backward(dout, L.layernorm_forward(x, g, b)[1])
        return {"x": dx, "g": dg, "b": db}
    _check(lambda x, g, b: L.layernorm_forward(x, g, b)[0], grad,
           {"x": rng.standard_normal((2, 3, 7)), "g": rng.standard_normal(7),
            "b": rng.standard_normal(7)}, mode="full")


def test_gelu_gradcheck(rng):
    _check(lambda x: L.gelu_forward(x)[0],
           lambda dout, x: {"x": L.gelu_backward(dout, L.gelu_forward(x)[1])},
           {"x": 2.0 * rng.standard_normal((3, 11))}, mode="full")


def test_mlp_gradcheck(rng):
    names = ("x", "W1", "b1", "W2", "b2")

    def grad(dout, **a):
        return dict(zip(names, L.mlp_backward(dout, L.mlp_forward(*(a[n] for n in names))[1])))
    _check(lambda **a: L.mlp_forward(*(a[n] for n in names))[0], grad,
           {"x": rng.standard_normal((2, 3, 4)), "W1": rng.standard_normal((4, 6)),
            "b1": rng.standard_normal(6), "W2": rng.standard_normal((6, 4)),
            "b2": rng.standard_normal(4)}, mode="full")


@pytest.mark.parametrize("width", [1, 3], ids=["w1", "w3"])
def test_causal_conv_gradcheck(rng, width):
    def grad(dout, x, c):
        dx, dc = L.causal_conv_backward(dout, L.causal_conv_forward(x, c)[1])
        return {"x": dx, "c": dc}
    _check(lambda x, c: L.causal_conv_forward(x, c)[0], grad,
           {"x": rng.standard_normal((2, 5, 3)), "c": rng.standard_normal((width, 3))}, mode="full")


def test_causal_conv_is_causal_and_continues_from_history(rng):
    x, c = rng.standard_normal((2, 9, 3)), rng.standard_normal((3, 3))
    full = L.causal_conv_forward(x, c)[0]
    y = x.copy()
    y[:, 6:] += 5.0                                        # the future changes nothing before it
    np.testing.assert_array_equal(L.causal_conv_forward(y, c)[0][:, :6], full[:, :6])
    second = L.causal_conv_forward(x[:, 4:], c, history=x[:, 2:4])[0]
    np.testing.assert_allclose(second, full[:, 4:], rtol=1e-13)


@pytest.mark.parametrize("masked", [False, True], ids=["all-tokens", "masked"])
def test_cross_entropy_gradcheck(rng, masked):
    targets = rng.integers(0, 7, (2, 5))
    mask = rng.random((2, 5)) < 0.6 if masked else None
    if masked:
        mask[0, 0] = True

    def fun(logits):
        return np.array(L.cross_entropy_forward(logits, targets, mask)[0])

    def grad(dout, logits):
        return {"logits": L.cross_entropy_backward(float(dout), L.cross_entropy_forward(logits, targets, mask)[1])}
    _check(fun, grad, {"logits": rng.standard_normal((2, 5, 7))}, mode="full")


def test_cross_entropy_matches_definition(rng):
    logits = rng.standard_normal((3, 4, 6))
    targets = rng.integers(0, 6, (3, 4))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.log(np.take_along_axis(p, targets[..., None], -1)).mean()
    assert abs(L.cross_entropy_forward(logits, targets)[0] - expected) < 1e-12


def test_classifier_gradcheck(rng):
    mask = np.array([[True, True, False, False, True], [False, True, True, True, True]])

    def grad(dout, x, W, b):
        dx, dW, db = L.classifier_backward(dout, L.classifier_forward(x, W, b, mask)[1])
        return {"x": dx, "W": dW, "b": db}
    report = _check(lambda x, W, b: L.classifier_forward(x, W, b, mask)[0], grad,
                    {"x": rng.standard_normal((2, 5, 3)), "W": rng.standard_normal((3, 4)),
                     "b": rng.standard_normal(4)}, mode="full")
    assert report["x"].checked == 30


def test_classifier_ignores_padding(rng):
    x = rng.standard_normal((1, 4, 3))
    mask = np.array([[True, False, True, False]])
    y = x.copy()
    y[0, 1] += 100.0                                   # a padding token changes nothing
    W, b = rng.standard_normal((3, 2)), np.zeros(2)
    np.testing.assert_allclose(L.classifier_forward(x, W, b, mask)[0],
                               L.classifier_forward(y, W, b, mask)[0], rtol=1e-12)


# ---------------------------------------------------------------- the GMA layer and a block

def _gma_params(rng, D, H, d, e, K, covariance, learn_tau):
    p = {"Wq": 0.5 * rng.standard_normal((D, H * d)), "bq": 0.1 * rng.standard_normal(H * d),
         "Wk": 0.5 * rng.standard_normal((D, H * d)), "bk": 0.1 * rng.standard_normal(H * d),
         "Wv": 0.5 * rng.standard_normal((D, H * e)), "bv": 0.1 * rng.standard_normal(H * e),
         "Wo": 0.5 * rng.standard_normal((H * e, D)), "bo": 0.1 * rng.standard_normal(D),
         "means": rng.standard_normal((H, K, d)),
         "log_var": 0.3 * rng.standard_normal((H, K, d) if covariance == "diag" else (H, K)),
         "logits": 0.5 * rng.standard_normal((H, K))}
    if learn_tau:
        p["log_tau"] = 0.3 * rng.standard_normal(H)
    return p


@pytest.mark.parametrize("covariance,learn_tau,norm", [
    ("diag", True, "row"), ("spherical", False, "row"), ("diag", False, "slot")],
    ids=["diag-tau-row", "spherical-notau-row", "diag-notau-slot"])
def test_gma_layer_gradcheck(rng, covariance, learn_tau, norm):
    D, H, d, e, K = 4, 2, 3, 2, 3
    p = _gma_params(rng, D, H, d, e, K, covariance, learn_tau)
    p["x"] = rng.standard_normal((2, 5, D))

    cfg = ModelConfig(d_model=D, n_heads=H, head_dim=d, value_dim=e, n_components=K,
                      covariance=covariance, learn_temperature=learn_tau, norm=norm)
    layer = get_mixer("gma")

    def fun(x, **q):
        return layer.forward(x, q, cfg, causal=True)[0]

    def grad(dout, x, **q):
        dx, g = layer.backward(dout, layer.forward(x, q, cfg, causal=True)[1])
        return {"x": dx, **g}
    report = _check(fun, grad, p, mode="full")
    assert ("log_tau" in [c.name for c in report.inputs]) == learn_tau


def test_block_gradcheck(rng):
    cfg = ModelConfig(vocab_size=7, max_len=6, d_model=4, n_layers=1, n_heads=2, head_dim=3,
                      value_dim=2, n_components=3, mlp_ratio=2, dtype="float64")
    model = LanguageModel(cfg, seed=3)
    bp = {n[3:]: v + 0.3 * rng.standard_normal(v.shape) for n, v in model.params.items()
          if n.startswith("h0.")}
    bp["x"] = rng.standard_normal((2, 5, 4))

    def grad(dout, x, **q):
        dx, g = block_backward(dout, block_forward(x, q, cfg)[1])
        return {"x": dx, **g}
    _check(lambda x, **q: block_forward(x, q, cfg)[0], grad, bp, mode="random", n_directions=2)


# ---------------------------------------------------------------- the whole model

def _tiny_model(rng, **kw):
    cfg = ModelConfig(**{**dict(vocab_size=11, max_len=7, d_model=8, n_layers=1, n_heads=2,
                                head_dim=3, value_dim=2, n_components=3, mlp_ratio=2,
                                dtype="float64"), **kw})
    model = LanguageModel(cfg, seed=1)
    for name, value in model.params.items():     # away from the symmetric initial point
        model.params[name] = value + 0.3 * rng.standard_normal(value.shape)
    return model


@pytest.mark.parametrize("kw", [dict(n_layers=2), dict(tie_embeddings=False, covariance="spherical",
                                                       learn_temperature=False, conv_width=0)],
                         ids=["L2-tied-diag-tau-conv4", "L1-untied-spherical-noconv"])
def test_whole_model_gradcheck_every_parameter(rng, kw):
    model = _tiny_model(rng, **kw)
    cfg = model.cfg
    idx, targets = rng.integers(0, 11, (2, 2, 6))

    def fun(**p):
        return np.array(lm_loss_forward(p, idx, targets, cfg)[0])

    def grad(dout, **p):
        return lm_loss_backward(lm_loss_forward(p, idx, targets, cfg)[1], float(dout))
    report = _check(fun, grad, dict(model.params), mode="random", n_directions=1)
    assert sorted(c.name for c in report.inputs) == sorted(model.params), "a parameter was not checked"


def test_smallest_model_gradcheck_every_element(rng):
    """Every element of every parameter (full mode) of a model with one of everything."""
    model = _tiny_model(rng, vocab_size=7, max_len=4, d_model=4, n_heads=1, head_dim=2,
                        value_dim=2, n_components=2, mlp_ratio=1, conv_width=2)
    cfg = model.cfg
    idx, targets = rng.integers(0, 7, (2, 2, 4))

    def fun(**p):
        return np.array(lm_loss_forward(p, idx, targets, cfg)[0])

    def grad(dout, **p):
        return lm_loss_backward(lm_loss_forward(p, idx, targets, cfg)[1], float(dout))
    report = _check(fun, grad, dict(model.params), mode="full")
    assert sum(c.checked for c in report.inputs) == model.n_params()


# ---------------------------------------------------------------- decode path

@pytest.mark.parametrize("dtype,conv", [(np.float64, 4), (np.float32, 4), (np.float64, 0)],
                         ids=["float64-conv4", "float32-conv4", "float64-noconv"])
def test_decode_matches_full_forward(rng, dtype, conv):
    model = _tiny_model(rng, n_layers=2, max_len=9, dtype=np.dtype(dtype).name, conv_width=conv)
    idx = rng.integers(0, 11, (3, 9))
    full, _ = model.forward(idx)                                     # (B, N, V)
    state = model.decode_init(3)
    chunks = []
    logits, state = model.decode(idx[:, :4], state)                  # a prompt in one chunk
    chunks.append(logits)
    for t in range(4, 9):                                            # then token by token
        logits, state = model.decode(idx[:, t:t + 1], state)
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=0,
                               atol=DECODE_ATOL[dtype] * np.abs(full).max())
    assert state.position == 9


def test_decode_past_max_len_clamps_the_position(rng):
    model = _tiny_model(rng, max_len=5)
    idx = rng.integers(0, 11, (1, 12))
    state = model.decode_init(1)
    logits = []
    for t in range(12):
        out, state = model.decode(idx[:, t:t + 1], state)
        logits.append(out)
    # the same model with a longer table whose extra rows repeat the last one
    long_cfg = ModelConfig(**{**model.config_dict(), "max_len": 12})
    params = dict(model.params)
    params["wpe"] = np.concatenate([model.params["wpe"]] + [model.params["wpe"][-1:]] * 7)
    full, _ = LanguageModel(long_cfg, params=params).forward(idx)
    np.testing.assert_allclose(np.concatenate(logits, axis=1), full, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- mixture initialisation

def _shares_per_layer(model, idx):
    """Responsibility share (H, K) of each layer's components over the batch's queries and keys."""
    from gma_np.nn.model import _block_params, _mixer_params
    cfg = model.cfg
    x = model.params["wte"][idx] + model.params["wpe"][:idx.shape[1]]
    out = []
    for l in range(cfg.n_layers):
        bp = _block_params(model.params, l)
        gp = _mixer_params(bp, cfg)
        h = L.layernorm_forward(x, bp["ln1.g"], bp["ln1.b"])[0]
        points = np.concatenate([split_heads(h @ gp["Wq"] + gp["bq"], cfg.n_heads),
                                 split_heads(h @ gp["Wk"] + gp["bk"], cfg.n_heads)])
        r = gma_np.responsibilities(points, gp["means"], gp["log_var"], gp["logits"],
                                    temperature_of(gp))
        out.append(component_shares(r))
        x = block_forward(x, bp, cfg)[0]
    return out


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
def test_no_dead_component_at_init(covariance):
    from gma_np.train.data import load_corpus, sample_batch
    cfg = ModelConfig(max_len=64, d_model=32, n_layers=2, n_heads=2, head_dim=8, value_dim=8,
                      n_components=7, covariance=covariance)
    corpus = load_corpus("")
    rng = np.random.default_rng(0)
    first, _ = sample_batch(corpus.train, 8, 64, rng)
    later, _ = sample_batch(corpus.train, 8, 64, rng)                # a batch init never saw
    random_init = LanguageModel(cfg, seed=0)
    model = LanguageModel(cfg, seed=0)
    model.init_from_data(first)
    threshold = DEAD_SHARE / cfg.n_components
    for l, shares in enumerate(_shares_per_layer(model, later)):
        assert shares.min() >= threshold, (f"layer {l}: component shares {shares.round(4)} "
                                           f"below {threshold:.4f} (dead)")
    # the random placeholder init does leave components dead: the test can fail
    assert min(s.min() for s in _shares_per_layer(random_init, later)) < threshold


def test_model_rejects_bad_input():
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(d_model=0)
    with pytest.raises(ValueError, match="covariance"):
        ModelConfig(covariance="full")
    model = LanguageModel(ModelConfig(vocab_size=5, max_len=4, d_model=4, n_layers=1,
                                         n_heads=1, head_dim=2, value_dim=2, n_components=2))
    with pytest.raises(ValueError, match="idx"):
        model.forward(np.array([[0, 7]]))
    with pytest.raises(TypeError, match="idx"):
        model.forward(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="positional table"):
        model.forward(np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="params"):
        LanguageModel(model.cfg, params={"wte": model.params["wte"]})


def test_layers_name_the_bad_argument(rng):
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(ValueError, match="^W: expected shape \\(4, Dout\\)"):
        L.linear_forward(x, rng.standard_normal((5, 2)), None)
    with pytest.raises(ValueError, match="^b:"):
        L.linear_forward(x, rng.standard_normal((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="^g, b:"):
        L.layernorm_forward(x, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="^idx: expected ids in \\[0, 5\\)"):
        L.embedding_forward(np.array([[0, 5]]), rng.standard_normal((5, 2)))
    with pytest.raises(ValueError, match="^c:"):
        L.causal_conv_forward(x, np.ones((2, 3)))
    with pytest.raises(ValueError, match="^targets:"):
        L.cross_entropy_forward(x, np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="^mask:"):
        L.masked_mean_pool_forward(x, np.ones((2, 2), dtype=bool))


# ---------------------------------------------------------------- the body, a bidirectional task's head

BIDIRECTIONAL = ("gma", "softmax", "linear", "performer")
# Real tokens of the two rows of the padded batch below (padding at the end of row 1).
LENGTHS = (7, 4)


def _classifier_model(mixer, seed=1, **kw):
    from gma_np.nn.heads import PooledClassifierHead
    cfg = ModelConfig(**{**dict(vocab_size=11, max_len=7, d_model=8, n_layers=2, n_heads=2,
                                head_dim=3, value_dim=2, n_components=3, mlp_ratio=2,
                                n_features=4, mixer=mixer, dtype="float64"), **kw})
    return LanguageModel(cfg, seed=seed, head=PooledClassifierHead(5))


def _padded(rng, pad_id=0):
    key_mask = np.arange(7)[None, :] < np.array(LENGTHS)[:, None]           # (2, 7)
    tokens = rng.integers(1, 11, (2, 7))
    tokens[~key_mask] = pad_id
    return tokens, key_mask


@pytest.mark.parametrize("mixer", BIDIRECTIONAL)
def test_bidirectional_body_ignores_padding_and_reads_both_ways(rng, mixer):
    model = _classifier_model(mixer)
    tokens, key_mask = _padded(rng)
    h = model.body(tokens, key_mask, causal=False)                          # (2, 7, D)
    other = tokens.copy()
    other[~key_mask] = rng.integers(1, 11, int((~key_mask).sum()))          # other padding ids
    h2 = model.body(other, key_mask, causal=False)
    np.testing.assert_allclose(h2[key_mask], h[key_mask], rtol=0, atol=1e-13)
    unmasked = model.body(other, None, causal=False)                        # padding read as real
    assert np.abs(unmasked[1, :LENGTHS[1]] - model.body(tokens, None, causal=False)[1, :LENGTHS[1]]).max() > 1e-6
    later = tokens.copy()
    later[1, LENGTHS[1] - 1] = later[1, LENGTHS[1] - 1] % 10 + 1            # the last real token of row 1
    h3 = model.body(later, key_mask, causal=False)
    assert np.abs(h3[1, 0] - h[1, 0]).max() > 1e-6, "an earlier token does not read a later one"
    assert np.array_equal(h3[0], h[0])                                      # rows stay apart
    h4 = model.body(later, key_mask, causal=True)
    h5 = model.body(tokens, key_mask, causal=True)
    assert np.array_equal(h4[1, 0], h5[1, 0]), "causal=True let a token read a later one"


def test_mixture_fit_sees_only_the_real_tokens(rng):
    """GMA's data-dependent init, with a key mask: padding ids do not change the mixture, a
    padded row fits as the row alone, and counting the padding as real does change it."""
    tokens, key_mask = _padded(rng)

    def fitted(tokens, key_mask, causal=False):
        model = _classifier_model("gma")
        model.init_from_data(tokens, np.random.default_rng(3), causal=causal, key_mask=key_mask)
        return {n: v for n, v in model.params.items()
                if n.rsplit(".", 1)[-1] in ("means", "log_var", "logits")}
    ref = fitted(tokens, key_mask)
    other = tokens.copy()
    other[~key_mask] = 7
    for name, value in fitted(other, key_mask).items():
        assert np.array_equal(value, ref[name]), name
    alone = fitted(tokens[1:, :LENGTHS[1]], None)
    for name, value in fitted(tokens[1:], key_mask[1:]).items():
        np.testing.assert_allclose(value, alone[name], rtol=1e-12, atol=1e-12, err_msg=name)
    counted = fitted(other, None)
    assert any(not np.allclose(counted[n], ref[n]) for n in ref), "padding did not matter: the test is void"


def test_classifier_model_gradcheck_every_parameter(rng):
    """Body (bidirectional, key mask) + pooled classifier: every parameter, float64."""
    from gma_np.nn.heads import add_head_grads
    from gma_np.nn.model import body_backward, body_forward
    model = _classifier_model("gma", n_layers=1)
    cfg = model.cfg
    tokens, key_mask = _padded(rng)
    labels = np.array([3, 1])

    class B:
        targets, loss_mask = labels, None
    B.key_mask = key_mask

    def fun(**p):
        h, _ = body_forward(p, tokens, cfg, causal=False, key_mask=key_mask)
        return np.array(model.head.forward(h, p, B, cfg)[0])

    def grad(dout, **p):
        h, c_body = body_forward(p, tokens, cfg, causal=False, key_mask=key_mask)
        dh, g_head = model.head.backward(model.head.forward(h, p, B, cfg)[1], float(dout))
        return add_head_grads(body_backward(dh, c_body), g_head)
    params = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in model.params.items()}
    report = _check(fun, grad, params, mode="random", n_directions=2)
    assert sorted(c.name for c in report.inputs) == sorted(model.params)
    assert {"cls.W", "cls.b"} <= set(model.params) and "head" not in model.params


def test_token_methods_need_a_token_head(rng):
    model = _classifier_model("gma")
    tokens, key_mask = _padded(rng)
    for call in (lambda: model.forward(tokens), lambda: model.decode_init(1),
                 lambda: model.loss_and_grads(tokens, tokens)):
        with pytest.raises(ValueError, match="needs a token head.*PooledClassifierHead"):
            call()
    with pytest.raises(ValueError, match="key_mask: expected a bool array of shape \\(2, 7\\)"):
        model.body(tokens, key_mask.astype(int))
    lm = _tiny_model(rng)
    with pytest.raises(ValueError, match="decoding is causal"):
        block_forward(np.zeros((1, 1, 8)), {n[3:]: v for n, v in lm.params.items() if n.startswith("h0.")},
                      lm.cfg, lm.decode_init(1).blocks[0], causal=False)
