"""gma_np.nn.decode: the fused decoding path against LanguageModel.decode (its reference) and the
training forward, for every mixer; its sampler against gma_np.train.evaluate's; its errors.

Tolerances, relative to max |logits|: float64 1e-12 (the same arithmetic in another order);
float32 2e-6 (RTOL_EXACT: the reference rounds every layer's output to float32, the fused
path keeps float64 throughout, so the difference is the reference's own roundings).
"""

import numpy as np
import pytest

from gma_np._numerics import RTOL_EXACT
from gma_np.mixers import MIXER_NAMES
from gma_np.nn import LanguageModel, ModelConfig
from gma_np.nn.decode import FastDecoder, generate, pick_token
from gma_np.train.evaluate import _pick
from gma_np.train.evaluate import generate as reference_generate
from tests.conftest import assert_close

# Parameters that keep their initial values: the mixture (fitted to the data) and the
# temperature; every other parameter gets noise of this size, so that the logits are
# far from uniform and every layer matters.
KEEP = ("means", "log_var", "logits", "log_tau")
NOISE = 0.2


def _model(mixer, dtype, seed=3, **overrides):
    """A small model of odd sizes: D = 21, H = 3, d = 5, e = 7, K = 5, m = 9, M = 42, S = 3."""
    fields = dict(mixer=mixer, vocab_size=13, max_len=11, d_model=21, n_layers=2, n_heads=3,
                  head_dim=5, value_dim=7, n_components=5, n_features=9, ssm_expand=2,
                  ssm_state=3, ssm_conv=3, mlp_ratio=2, conv_width=3, dtype=dtype)
    fields.update(overrides)
    model = LanguageModel(ModelConfig(**fields), seed=seed)
    rng = np.random.default_rng(seed)
    if model.mixer.init_from_data is not None:
        model.init_from_data(rng.integers(0, 13, (2, 11)), rng)
    for name, value in model.params.items():
        if not name.endswith(KEEP):
            model.params[name] = (value + NOISE * rng.standard_normal(value.shape)).astype(dtype)
    return model


def _fast_logits(model, idx, chunks):
    """The decoder's logits of idx (B, N), fed in chunks of the given sizes."""
    decoder = FastDecoder(model, idx.shape[0])
    out, t = [], 0
    for n in chunks:
        out.append(decoder.decode(idx[:, t:t + n]))
        t += n
    assert decoder.position == idx.shape[1] and not decoder.uses_reference
    return np.concatenate(out, axis=1)


def _reference_logits(model, idx):
    state = model.decode_init(idx.shape[0])
    out = []
    for t in range(idx.shape[1]):
        logits, state = model.decode(idx[:, t:t + 1], state)
        out.append(logits)
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_fast_decode_matches_reference_and_forward(mixer, dtype):
    model = _model(mixer, dtype)
    idx = np.random.default_rng(0).integers(0, 13, (2, 15))         # 4 past max_len = 11
    fast = _fast_logits(model, idx, [4, 1, 1, 3, 1, 1, 1, 1, 1, 1])
    rtol = RTOL_EXACT[np.dtype(dtype)]
    assert fast.dtype == np.dtype(dtype)
    assert_close(f"{mixer} {dtype} fast vs LanguageModel.decode", fast, _reference_logits(model, idx),
                 rtol)
    assert_close(f"{mixer} {dtype} fast vs the training forward", fast[:, :11],
                 model.forward(idx[:, :11])[0], rtol)


@pytest.mark.parametrize("overrides", [
    dict(covariance="spherical", norm="slot", learn_temperature=False),
    dict(conv_width=0),
    dict(conv_width=1, n_layers=3),
], ids=["gma-spherical-slot-fixed-tau", "gma-no-conv", "gma-conv1-3-layers"])
def test_fast_decode_gma_configurations(overrides):
    model = _model("gma", "float64", **overrides)
    if "log_tau" in model.params:                                   # not 1: the step must read it
        model.params["h0.gma.log_tau"] = np.array([0.3, -0.2, 0.5])
    idx = np.random.default_rng(1).integers(0, 13, (1, 9))
    assert_close("gma configuration", _fast_logits(model, idx, [2, 1, 5, 1]),
                 model.forward(idx)[0], RTOL_EXACT[np.dtype(np.float64)])


def test_softmax_cache_grows_past_its_first_capacity():
    # 70 tokens: past KV_INITIAL_CAPACITY = 64, in a chunk of 60 then one by one
    model = _model("softmax", "float64", max_len=70, n_layers=1)
    idx = np.random.default_rng(2).integers(0, 13, (1, 70))
    assert_close("softmax past capacity", _fast_logits(model, idx, [60] + [1] * 10),
                 model.forward(idx)[0], RTOL_EXACT[np.dtype(np.float64)])


def test_reset_starts_over():
    model = _model("gma", "float32")
    idx = np.random.default_rng(4).integers(0, 13, (2, 6))
    decoder = FastDecoder(model, 2)
    first = decoder.decode(idx)
    decoder.decode(idx[:, :2])
    decoder.reset()
    assert decoder.position == 0
    np.testing.assert_array_equal(decoder.decode(idx), first)


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("temperature,top_k", [(0, 0), (1.0, 0), (0.37, 0), (2.5, 0), (0.8, 1),
                                               (0.8, 5), (1.0, 13), (0.8, 40)])
def test_pick_token_draws_as_the_reference(temperature, top_k):
    data = np.random.default_rng(5)
    mine, theirs = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(300):
        logits = data.standard_normal(13) * data.uniform(0.1, 8.0)
        logits[data.integers(0, 13)] = logits.max()                  # ties with the top too
        assert pick_token(logits, temperature, top_k, mine) == _pick(logits, temperature, top_k, theirs)
    assert mine.bit_generator.state == theirs.bit_generator.state


def test_pick_token_refuses_nonfinite_logits():
    for bad in (np.nan, np.inf):
        logits = np.zeros(5)
        logits[2] = bad
        with pytest.raises(ValueError, match="logits: expected finite"):
            pick_token(logits, 1.0, 0, np.random.default_rng(0))


@pytest.mark.parametrize("mixer", ["gma", "mamba"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_generate_gives_the_reference_text(mixer, dtype):
    # the same bytes for these seeds in float32 too: the logits come back rounded to float32,
    # mostly to the reference's own float32 values (docs/performance.md, "Decoding")
    model = _model(mixer, dtype, vocab_size=256, max_len=32)
    for seed, temperature, top_k in ((0, 0.8, 0), (1, 1.0, 7), (2, 0, 0)):
        kw = dict(temperature=temperature, top_k=top_k)
        assert (generate(model, b"ab", 120, rng=np.random.default_rng(seed), **kw)
                == reference_generate(model, b"ab", 120, rng=np.random.default_rng(seed), **kw))


# ---------------------------------------------------------------- errors

def test_nonfinite_value_raises_the_reference_error():
    model = _model("gma", "float64")
    model.params["h0.mlp.W2"] = np.full_like(model.params["h0.mlp.W2"], np.inf)   # x is not finite
    idx = np.array([[1, 2, 3]])
    with pytest.raises(ValueError) as reference, np.errstate(invalid="ignore"):
        model.decode(idx, model.decode_init(1))
    decoder = FastDecoder(model, 1)
    assert not decoder.uses_reference
    with pytest.raises(ValueError) as fast, np.errstate(invalid="ignore"):
        decoder.decode(idx)
    assert str(fast.value) == str(reference.value)
    with pytest.raises(ValueError, match="call reset"):
        decoder.decode(idx)


def test_parameters_the_kernel_cannot_take_go_to_the_reference():
    model = _model("gma", "float64")
    model.params["h1.gma.log_var"][0, 0, 0] = np.nan
    decoder = FastDecoder(model, 1)
    assert decoder.uses_reference
    with pytest.raises((ValueError, FloatingPointError)) as fast:
        decoder.decode(np.array([[1]]))
    with pytest.raises(type(fast.value)) as reference:
        model.decode(np.array([[1]]), model.decode_init(1))
    assert str(fast.value) == str(reference.value)


def test_bad_arguments_are_named():
    model = _model("linear", "float64")
    with pytest.raises(TypeError, match="model: expected a LanguageModel"):
        FastDecoder(model.params)
    with pytest.raises(ValueError, match="batch_size"):
        FastDecoder(model, 0)
    decoder = FastDecoder(model, 2)
    with pytest.raises(ValueError, match=r"tokens: expected shape \(2, n\)"):
        decoder.decode(np.array([[1, 2]]))
    with pytest.raises(TypeError, match="tokens: expected integer"):
        decoder.decode(np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 13\)"):
        decoder.decode(np.array([[1], [13]]))
    with pytest.raises(TypeError, match="prompt"):
        generate(model, "text", 3)
