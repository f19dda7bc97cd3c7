"""Bad input gets a clear error naming the argument, what was expected and what came:
never a Numba typing traceback and never a silent answer."""

import numpy as np
import pytest

import gma_np
from tests.conftest import make_problem

B, H, N, d, e, K = 2, 3, 5, 4, 2, 3


@pytest.fixture
def problem():
    inputs, _ = make_problem(np.random.default_rng(0), B=B, H=H, N=N, d=d, e=e, K=K)
    return inputs


def _with(inputs, **changes):
    out = dict(inputs)
    out.update(changes)
    return out


CASES = {
    # name: (changes, extra kwargs, exception, regex that the message must match)
    "q ndim": (dict(q=np.zeros((H, N, d))), {}, ValueError, r"q: expected 4 dimensions, got shape \(3, 5, 4\)"),
    "k shape": (dict(k=np.zeros((B, H, N + 1, d))), {}, ValueError, r"k: expected shape \(2, 3, 5, 4\)"),
    "v shape": (dict(v=np.zeros((B, H, N + 2, e))), {}, ValueError, r"v: expected shape \(B, H, N, e\)"),
    "heads mismatch": (dict(means=np.zeros((H + 1, K, d)), log_var=np.zeros((H + 1, K, d)),
                            logits=np.zeros((H + 1, K))), {}, ValueError, r"q: has 3 heads but means has 4"),
    "d mismatch": (dict(means=np.zeros((H, K, d + 1)), log_var=np.zeros((H, K, d + 1))), {},
                   ValueError, r"q: has feature size d = 4 but means has d = 5"),
    "K mismatch log_var": (dict(log_var=np.zeros((H, K + 1, d))), {}, ValueError,
                           r"log_var: expected shape \(H, K, d\) = \(3, 3, 4\)"),
    "K mismatch logits": (dict(logits=np.zeros((H, K + 1))), {}, ValueError,
                          r"logits: expected shape \(3, 3\)"),
    "int q": (dict(q=np.zeros((B, H, N, d), dtype=np.int64)), {}, TypeError,
              r"q: expected dtype float32 or float64, got int64"),
    "complex v": (dict(v=np.zeros((B, H, N, e), dtype=complex)), {}, TypeError,
                  r"v: expected dtype float32 or float64, got complex128"),
    "bool means": (dict(means=np.zeros((H, K, d), dtype=bool)), {}, TypeError, r"means: expected dtype"),
    "mixed dtypes": (dict(k=np.zeros((B, H, N, d), dtype=np.float32)), {}, TypeError,
                     r"q, k, v: expected one dtype, got q float64, k float32"),
    "list q": (dict(q="not an array"), {}, TypeError, r"q: expected a NumPy array, got str"),
    "nan q": (dict(q=np.full((B, H, N, d), np.nan)), {}, ValueError, r"q: expected finite values, got nan"),
    "inf log_var": (dict(log_var=np.full((H, K, d), np.inf)), {}, ValueError, r"log_var: expected finite"),
    "tau zero": ({}, dict(temperature=0.0), ValueError, r"temperature: expected finite values > 0"),
    "tau negative head": ({}, dict(temperature=np.array([1.0, -1.0, 1.0])), ValueError, r"temperature: expected finite values > 0"),
    "tau nan": ({}, dict(temperature=float("nan")), ValueError, r"temperature: expected finite values > 0"),
    "tau length": ({}, dict(temperature=np.ones(H + 1)), ValueError, r"temperature: expected a scalar or shape \(3,\)"),
    "tau int array": ({}, dict(temperature=np.array([1, 2, 1])), TypeError,
                      r"temperature: expected a float32 or float64 array, got dtype int64"),
    "tau string": ({}, dict(temperature="1"), TypeError, r"temperature: expected a positive float"),
    "norm": ({}, dict(norm="softmax"), ValueError, r"norm: expected one of \('row', 'slot'\), got 'softmax'"),
    "key_mask shape": ({}, dict(key_mask=np.ones((B, N + 1), dtype=bool)), ValueError,
                       r"key_mask: expected shape \(B, N\) = \(2, 5\), got \(2, 6\)"),
    "key_mask values": ({}, dict(key_mask=np.full((B, N), 2)), ValueError, r"key_mask: expected only 0/1"),
    "key_mask list": ({}, dict(key_mask=[[1] * N] * B), TypeError, r"key_mask: expected a boolean array"),
    "eps negative": ({}, dict(eps=-1e-6), ValueError, r"eps: expected a finite float >= 0, got -1e-06"),
    "eps string": ({}, dict(eps="1e-6"), TypeError, r"eps: expected a float >= 0"),
    "causal string": ({}, dict(causal="yes"), TypeError, r"causal: expected a bool"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gma_rejects_bad_input(problem, case, causal):
    changes, kwargs, exc, pattern = CASES[case]
    args = _with(problem, **changes)
    kwargs = dict(dict(causal=causal), **kwargs)
    if "temperature" in kwargs:
        args["temperature"] = kwargs.pop("temperature")
    with pytest.raises(exc, match=pattern):
        gma_np.gma(**args, **kwargs)


def test_backward_checks_the_cotangent(problem):
    o, cache = gma_np.gma_forward(**problem)
    with pytest.raises(ValueError, match=r"do: expected shape \(2, 3, 5, 2\)"):
        gma_np.gma_backward(np.ones((B, H, N, e + 1)), cache)
    with pytest.raises(ValueError, match=r"do: expected finite"):
        gma_np.gma_backward(np.full(o.shape, np.inf), cache)
    with pytest.raises(TypeError, match=r"do: expected dtype"):
        gma_np.gma_backward(np.ones(o.shape, dtype=np.int32), cache)


def test_routing_rejects_bad_input(problem):
    p = {n: problem[n] for n in ("means", "log_var", "logits")}
    with pytest.raises(ValueError, match=r"x: expected at least 3 dimensions"):
        gma_np.responsibilities(np.zeros((N, d)), **p)
    with pytest.raises(ValueError, match=r"x: has 2 heads but means has 3"):
        gma_np.responsibilities(np.zeros((2, N, d)), **p)
    with pytest.raises(ValueError, match=r"temperature"):
        gma_np.responsibilities(np.zeros((H, N, d)), **p, temperature=-2.0)
    with pytest.raises(ValueError, match=r"log_var: expected shape \(H, K, d\) = \(3, 3, 4\) for diagonal or \(H, K\)"):
        gma_np.log_likelihood(np.zeros((H, N, d)), p["means"], np.zeros((H, d)), p["logits"])
    r, cache = gma_np.responsibilities_forward(np.zeros((H, N, d)), **p)
    with pytest.raises(ValueError, match=r"dr: expected shape \(3, 5, 3\)"):
        gma_np.responsibilities_backward(np.zeros((H, N, K + 1)), cache)


def test_step_rejects_bad_input(problem):
    p = {n: problem[n] for n in ("means", "log_var", "logits")}
    with pytest.raises(ValueError, match=r"q_t: expected 3 dimensions"):
        gma_np.gma_step(np.zeros((B, H, 1, d)), np.zeros((B, H, d)), np.zeros((B, H, e)), **p)


def test_float32_inputs_with_float64_parameters_are_fine(problem):
    """Parameters may come in either float dtype: they are cast to the computation dtype of q."""
    q, k, v = (problem[n].astype(np.float32) for n in ("q", "k", "v"))
    o = gma_np.gma(q, k, v, problem["means"], problem["log_var"], problem["logits"])
    assert o.dtype == np.float32
