"""Bad input gets a clear error naming the argument, what was expected and what came:
never a Numba typing traceback and never a silent answer."""

import re
import warnings

import numpy as np
import pytest

import gma_np
from gma_np import _validation as check
from gma_np.mixers.gma import mixing
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


# gma_forward and gma_backward take the finiteness of q, k, v and do from the checks of
# their own results (gma_np.mixers.gma.mixing, "Finiteness"): one NaN, inf or -inf,
# anywhere, in every form, must still get the ValueError an up-front check gives, with
# that entry's index, and no RuntimeWarning on the way.
FORMS = ["bidirectional", "scan", "chunked", "recurrent"]


def _bad_positions(shape, rng):
    """Flat indices of one entry: the first, the last, and three at random."""
    size = int(np.prod(shape))
    return sorted({0, size - 1, *(int(i) for i in rng.integers(0, size, 3))})


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("name, form", [(n, f) for n in ("q", "k", "v", "do") for f in FORMS
                                         if (n, f) != ("do", "recurrent")])   # no backward there
def test_one_non_finite_entry_is_named_with_its_index(monkeypatch, name, form, norm, masked, dtype):
    # the chunked form is taken from K e >= CHUNKED_MIN_KE; force it (and the scan) here
    monkeypatch.setattr(mixing, "causal_form",
                        lambda K, e: "chunked" if form == "chunked" else "scan")
    rng = np.random.default_rng(7)
    Bt, Ht, Nt = 2, 2, 7
    inputs, _ = make_problem(rng, B=Bt, H=Ht, N=Nt, d=3, e=2, K=3)
    arrays = {n: inputs[n].astype(dtype) for n in ("q", "k", "v")}
    arrays["do"] = rng.standard_normal((Bt, Ht, Nt, 2)).astype(dtype)
    params = {n: inputs[n] for n in ("means", "log_var", "logits", "temperature")}
    shape = arrays[name].shape
    for flat in _bad_positions(shape, rng):
        index = tuple(int(i) for i in np.unravel_index(flat, shape))
        mask = None
        if masked:                                     # the bad entry's token masked too
            mask = rng.random((Bt, Nt)) > 0.5
            mask[index[0], index[2]] = False
        for value in (np.nan, np.inf, -np.inf):
            bad = dict(arrays)
            bad[name] = arrays[name].copy()
            bad[name][index] = value
            message = re.escape(f"{name}: expected finite values, got {bad[name][index]} at index "
                                f"{index} (1 non-finite entries)")
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(ValueError, match="^" + message):
                    if form == "recurrent":
                        gma_np.gma_recurrent(bad["q"], bad["k"], bad["v"], **params, norm=norm,
                                             key_mask=mask)
                    else:
                        o, cache = gma_np.gma_forward(bad["q"], bad["k"], bad["v"], **params,
                                                      causal=form != "bidirectional", norm=norm,
                                                      key_mask=mask)
                        gma_np.gma_backward(bad["do"], cache)


@pytest.mark.parametrize("form", ["bidirectional", "chunked"])
def test_the_blas_forms_check_v_and_do_before_their_products(monkeypatch, form):
    """A BLAS may skip a zero operand (the reference BLAS does) and so drop a NaN at a
    masked key: the forms built on BLAS products check v and do themselves. Here their
    kernels are given the arrays with the NaN replaced, as such a BLAS would leave them."""
    monkeypatch.setattr(mixing, "causal_form", lambda K, e: "chunked")
    names = {"bidirectional": ("_bidirectional_forward", "_bidirectional_backward"),
             "chunked": ("causal_chunked_forward", "causal_chunked_backward")}[form]
    forward, backward = (getattr(mixing, n) for n in names)
    monkeypatch.setattr(mixing, names[0],
                        lambda rq, rk, v, *a: forward(rq, rk, np.nan_to_num(v), *a))
    monkeypatch.setattr(mixing, names[1],
                        lambda rq, rk, v, do, *a: backward(rq, rk, v, np.nan_to_num(do), *a))
    inputs, _ = make_problem(np.random.default_rng(8), B=1, H=2, N=5, d=3, e=2, K=3)
    do = np.ones((1, 2, 5, 2))
    causal = form == "chunked"
    bad_v = inputs["v"].copy()
    bad_v[0, 1, 3, 0] = np.nan
    message = "v: expected finite values, got nan at index (0, 1, 3, 0)"
    with pytest.raises(ValueError, match=re.escape(message)):
        gma_np.gma_forward(**dict(inputs, v=bad_v), causal=causal)
    _, cache = gma_np.gma_forward(**inputs, causal=causal)
    bad_do = do.copy()
    bad_do[0, 0, 2, 1] = np.nan
    message = "do: expected finite values, got nan at index (0, 0, 2, 1)"
    with pytest.raises(ValueError, match=re.escape(message)):
        gma_np.gma_backward(bad_do, cache)


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


# ---------------------------------------------------------------------------------------
# Non-finite intermediates: a FloatingPointError naming the argument and the cause, where
# the intermediate arises; never a NaN answer, a NumPy warning, or blame on eps.
# ---------------------------------------------------------------------------------------

def _no_warnings(fn):
    """fn() with every NumPy warning turned into an error: none may leak."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def _mixture_of(problem, **changes):
    return {n: changes.get(n, problem[n]) for n in ("means", "log_var", "logits")}


def _tiny_log_var(problem):
    log_var = problem["log_var"].copy()
    log_var[1, 2, 0] = -800.0                                      # exp(800) = inf
    return log_var


OVERFLOW_MESSAGE = {
    "log_var": r"log_var: the inverse variance exp\(-log_var\) overflows float64 at index \(1, 2, 0\) "
               r"\(log_var = -800.0\); expected log_var > -709.78",
    "q": r"q: the log-density of the point at \(b, h, n\) = \(0, 0, 0\) overflows float64 for every "
         r"component: sum_j \(x_j - mu_kj\)\^2 / sigma2_kj > 1.8e\+308",
    "x": r"x: the log-density of the point at \(p, h, n\) \(p: the leading axes flattened\) = "
         r"\(0, 0, 0\) overflows float64 for every component",
}


def test_responsibilities_with_an_overflowing_inverse_variance(problem):
    mix = _mixture_of(problem, log_var=_tiny_log_var(problem))
    x = problem["q"][0]
    for fn in (gma_np.responsibilities, gma_np.log_likelihood):
        with pytest.raises(FloatingPointError, match=OVERFLOW_MESSAGE["log_var"]):
            _no_warnings(lambda: fn(x, **mix))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gma_with_an_overflowing_inverse_variance_blames_log_var_not_eps(problem, causal):
    args = _with(problem, log_var=_tiny_log_var(problem))
    with pytest.raises(FloatingPointError, match=OVERFLOW_MESSAGE["log_var"]) as err:
        _no_warnings(lambda: gma_np.gma(**args, causal=causal))
    assert "eps" not in str(err.value)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gma_with_an_overflowing_log_density_blames_q(problem, causal):
    args = _with(problem, q=problem["q"] * 1e200)                  # (x - mu)^2 = 1e400
    with pytest.raises(FloatingPointError, match=OVERFLOW_MESSAGE["q"]) as err:
        _no_warnings(lambda: gma_np.gma(**args, causal=causal))
    assert "eps" not in str(err.value)


def test_routing_with_an_overflowing_log_density_blames_x(problem):
    mix = _mixture_of(problem)
    x = problem["q"][0] * 1e200
    for fn in (gma_np.responsibilities, gma_np.log_likelihood):
        with pytest.raises(FloatingPointError, match=OVERFLOW_MESSAGE["x"]):
            _no_warnings(lambda: fn(x, **mix))


def test_recurrent_and_step_report_the_same_causes(problem):
    args = _with(problem, q=problem["q"] * 1e200)
    with pytest.raises(FloatingPointError, match=OVERFLOW_MESSAGE["q"]):
        _no_warnings(lambda: gma_np.gma_recurrent(**args))
    p = _mixture_of(problem, log_var=_tiny_log_var(problem))
    with pytest.raises(FloatingPointError, match=OVERFLOW_MESSAGE["log_var"]):
        _no_warnings(lambda: gma_np.gma_step(problem["q"][:, :, 0], problem["k"][:, :, 0],
                                             problem["v"][:, :, 0], **p))
    with pytest.raises(FloatingPointError, match=r"q_t: the log-density of the point at \(b, h, n\) = "
                                                 r"\(0, 0, 0\) overflows float64"):
        _no_warnings(lambda: gma_np.gma_step(problem["q"][:, :, 0] * 1e200, problem["k"][:, :, 0],
                                             problem["v"][:, :, 0], **_mixture_of(problem)))


MIXTURE_OVERFLOWS = {
    # name: (changes, message)
    "means far apart": (lambda p: dict(means=p["means"] * 1e200),
                        r"means: \(mu - c\)\^2 / sigma\^2 overflows float64 for \(head, component\)"),
    "logits span": (lambda p: dict(logits=np.tile([1.7e308, -1.7e308, 0.0], (H, 1))),
                    r"logits: log pi = logits - logsumexp\(logits\) overflows float64 for head 0"),
    "log_var sum": (lambda p: dict(log_var=np.full((H, K, d), 1e308)),
                    r"log_var: the log-density constant -1/2 sum_j log_var overflows float64"),
    "tiny temperature": (lambda p: dict(temperature=1e-320),
                         r"temperature: 1 / tau overflows float64 for tau = 1e-320"),
}


@pytest.mark.parametrize("case", list(MIXTURE_OVERFLOWS), ids=list(MIXTURE_OVERFLOWS))
def test_mixture_overflows_name_the_parameter(problem, case):
    changes, pattern = MIXTURE_OVERFLOWS[case]
    args = _with(problem, **changes(problem))
    with pytest.raises(FloatingPointError, match=pattern):
        _no_warnings(lambda: gma_np.gma(**args))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_an_overflowing_memory_blames_v(problem, causal, norm):
    args = _with(problem, v=np.full(problem["v"].shape, 1.5e308))  # finite, but sum r v is not
    with pytest.raises(FloatingPointError, match=r"v: the output of the query at \(p, n\) = .* "
                                                 r"overflows float64.*\|v\| up to 1.5e\+308") as err:
        _no_warnings(lambda: gma_np.gma(**args, causal=causal, norm=norm))
    assert "eps" not in str(err.value)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_eps_zero_on_an_empty_memory_still_names_eps(problem, causal, norm):
    mask = np.zeros((B, N), dtype=bool)                            # nothing is ever written
    with pytest.raises(FloatingPointError, match=r"gma: the output is not finite; with eps = 0.0 a "
                                                 r"query that reads an empty memory \(all keys masked "
                                                 r"so far\) divides 0 by 0: pass eps > 0"):
        _no_warnings(lambda: gma_np.gma(**problem, causal=causal, norm=norm, eps=0.0, key_mask=mask))


def _huge(shape):
    """A finite cotangent of entries +-1e308 (alternating), whose backward overflows."""
    return np.where(np.arange(np.prod(shape)).reshape(shape) % 2, 1e308, -1e308)


def test_an_overflowing_backward_blames_the_cotangent(problem):
    o, cache = gma_np.gma_forward(**problem)
    with pytest.raises(FloatingPointError, match=r"do: the gradient of \w+ overflows float64 at index "
                                                 r".*\|do\| up to 1e\+308\): rescale do"):
        _no_warnings(lambda: gma_np.gma_backward(_huge(o.shape), cache))
    mix = _mixture_of(problem)
    r, rcache = gma_np.responsibilities_forward(problem["q"][0], **mix)
    with pytest.raises(FloatingPointError, match=r"dr: the gradient of \w+ overflows float64"):
        _no_warnings(lambda: gma_np.responsibilities_backward(_huge(r.shape), rcache))
    ll, lcache = gma_np.log_likelihood_forward(problem["q"][0], **mix)
    with pytest.raises(FloatingPointError, match=r"dll: the gradient of \w+ overflows float64"):
        _no_warnings(lambda: gma_np.log_likelihood_backward(_huge(ll.shape), lcache))


def test_ordinary_calls_emit_no_warnings(problem):
    for causal in (False, True):
        o, cache = _no_warnings(lambda: gma_np.gma_forward(**problem, causal=causal))
        _no_warnings(lambda: gma_np.gma_backward(np.ones_like(o), cache))


# ---------------------------------------------------------------------------------------
# A wrong cache or state: a TypeError saying what was expected and what came.
# ---------------------------------------------------------------------------------------

def test_a_wrong_cache_gets_a_type_error(problem):
    o, gcache = gma_np.gma_forward(**problem)
    mix = _mixture_of(problem)
    r, rcache = gma_np.responsibilities_forward(problem["q"][0], **mix)
    ll, lcache = gma_np.log_likelihood_forward(problem["q"][0], **mix)
    expected = {
        "gma": r"cache: expected the GMACache that gma_forward returns, got {}",
        "responsibilities": r"cache: expected the RoutingCache that responsibilities_forward returns, got {}",
        "log_likelihood": r"cache: expected the LogLikelihoodCache that log_likelihood_forward returns, got {}",
    }
    calls = {
        "gma": lambda c: gma_np.gma_backward(np.ones_like(o), c),
        "responsibilities": lambda c: gma_np.responsibilities_backward(np.ones_like(r), c),
        "log_likelihood": lambda c: gma_np.log_likelihood_backward(np.ones_like(ll), c),
    }
    wrong = {"dict": {}, "None": None, "GMACache": gcache, "RoutingCache": rcache,
             "LogLikelihoodCache": lcache}
    right = {"gma": "GMACache", "responsibilities": "RoutingCache", "log_likelihood": "LogLikelihoodCache"}
    for fn, call in calls.items():
        for came, cache in wrong.items():
            if came == right[fn]:
                continue
            with pytest.raises(TypeError, match=expected[fn].format(came)):
                call(cache)


@pytest.mark.parametrize("state", [{}, (np.zeros((B, H, K, e)), np.zeros((B, H, K))), "S"],
                         ids=["dict", "tuple", "str"])
def test_a_wrong_state_gets_a_type_error(problem, state):
    came = type(state).__name__
    with pytest.raises(TypeError, match=rf"state: expected a GMAState \(see init_state\) or None, got {came}"):
        gma_np.gma_recurrent(**problem, state=state)
    with pytest.raises(TypeError, match=rf"state: expected a GMAState \(see init_state\) or None, got {came}"):
        gma_np.gma_step(problem["q"][:, :, 0], problem["k"][:, :, 0], problem["v"][:, :, 0],
                        **_mixture_of(problem), state=state)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_all_finite_is_the_entry_by_entry_test(dtype):
    """all_finite (a Numba sum of x - x for contiguous arrays, NumPy's sum for others; no
    boolean temporary) answers as np.isfinite(x).all(): one NaN, inf or -inf at every
    position of 37 entries (vector lanes and the tail), an inf and a -inf together, in C,
    F and strided layouts; finite entries whose sum overflows, the largest finite values,
    the subnormals and an empty array are finite."""
    rng = np.random.default_rng(0)
    info = np.finfo(dtype)
    finite_cases = [np.full(10, info.max / 4, dtype=dtype), np.ones(0, dtype=dtype),
                    np.full(37, info.max, dtype), np.full(37, -info.max, dtype),
                    np.full(37, info.smallest_subnormal, dtype),
                    rng.standard_normal((6, 7)).astype(dtype)[::2, 1::3]]
    for a in finite_cases:
        assert check.all_finite(a), a
    x = rng.standard_normal(37).astype(dtype)
    for bad in (np.nan, np.inf, -np.inf):
        for i in range(37):
            y = x.copy()
            y[i] = bad
            assert not check.all_finite(y), (bad, i)
        grid = np.ones((5, 7), dtype)
        grid[3, 4] = bad
        for view in (grid, np.asfortranarray(grid), grid.T, grid[:, ::2], grid[::2]):
            assert check.all_finite(view) == bool(np.isfinite(view).all()), (bad, view.flags)
    both = x.copy()
    both[[5, 30]] = [np.inf, -np.inf]                              # their sum is NaN
    assert not check.all_finite(both)
    assert check.first_nonfinite(both) == (5,)
