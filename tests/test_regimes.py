"""The fast paths are no less accurate than the direct form, in every regime, against 60 digits.

Dimension legend: B batch, H heads, N tokens, K components, d query/key size, e value size.

For each regime of the sweep (component widths e^-14 .. e^6, data scales 1e-3 .. 30,
mixtures over the data, around it far from the origin, or far from it, temperatures
0.05 .. 50, diagonal and spherical covariance) a tiny problem is solved three ways:

- the 60-digit oracle of the definition (tests/oracle.py: mpmath, complex-step gradients);
- the fast path (the public API: GEMM routing on centred points, fused kernels);
- the direct form: the same public API with the routing done by the direct-form
  kernels instead (gma_np.mixers.gma.routing.route_forward_direct and friends), the naive
  form a port would write.

and for every output (r, the log-likelihood, the gma output) and every gradient the
test asserts

    err_fast <= RATIO * max(err_direct, floor),      err = max |result - oracle|

where the floor is what no float64 method can beat: FLOOR_ULPS ulps of the largest
entry of the oracle's result, and, where the fast path is not already within RATIO of
the direct form, the change that rounding once to float64 each of the quantities
every method rounds on its way makes to that result: the log-densities l, the
inverse variances exp(-log_var), the weights pi and the cotangent (offsets of one
ulp, random sign, entry by entry, applied in the oracle; the largest change over
FLOOR_SAMPLES draws of the signs). Which of two
methods happens to round the few entries that matter in the same direction is luck,
and the floor keeps luck from deciding a test. It does not hide a loss of digits:
the floor perturbs neither x nor the means, whose difference the direct form
takes exactly.

mpmath is an optional test dependency: without it this file is skipped.
"""

import itertools

import numpy as np
import pytest
from scipy.special import logsumexp

mpmath = pytest.importorskip("mpmath")

import gma_np                                                       # noqa: E402
from gma_np._numerics import DEFAULT_EPS                           # noqa: E402
from gma_np.mixers.gma import mixing, routing                              # noqa: E402
from tests import oracle                                            # noqa: E402

EPS = np.finfo(np.float64).eps
RATIO = 2.0          # the fast path's error may be at most twice the direct form's
FLOOR_ULPS = 4       # a few ulps of the result: below that no float64 answer is more exact
TINY = 1e-300        # below the normal range of float64 nothing is measured
FLOOR_SAMPLES = 3    # draws of the rounding signs behind the floor

WIDTHS = [-14.0, -9.0, -4.0, 0.0, 6.0]           # log-variances
SCALES = [1e-3, 1.0, 30.0]                       # spread of data and means
PLACES = ["over", "drawn", "apart"]              # see problem()
TAUS = [0.05, 1.0, 50.0]
COVARIANCES = ["diag", "spherical"]

ROUTING_GRADS = ["x", "means", "log_var", "logits", "temperature"]
LIKELIHOOD_GRADS = ["x", "means", "log_var", "logits"]
GMA_GRADS = ["q", "k", "v", "means", "log_var", "logits", "temperature"]


def problem(seed, width, scale, place, covariance, H=1, K=3, d=2):
    """The mixture (means, log_var, logits) of one regime and a function drawing its points
    (..., H, N, d). Means: scale N(0, 1) around an origin; log_var: width + 0.3 N(0, 1).
    Points, by place: "over": scale N(0, 1), the mixture over the data; "drawn": each from
    one component of the mixture, which sits 100 scales from 0 (where the GEMM expansion
    cancels unless centred and guarded); "apart": scale N(0, 1) with the mixture 20
    scales away."""
    rng = np.random.default_rng(seed)
    origin = {"over": 0.0, "drawn": 100.0, "apart": 20.0}[place] * scale
    means = origin + scale * rng.standard_normal((H, K, d))
    log_var = width + 0.3 * rng.standard_normal((H, K, d) if covariance == "diag" else (H, K))
    logits = 0.5 * rng.standard_normal((H, K))
    sigma = np.exp(0.5 * (log_var if covariance == "diag" else log_var[:, :, None] + np.zeros(d)))

    def points(*shape):                                          # shape (..., H, N, d)
        if place != "drawn":
            return scale * rng.standard_normal(shape)
        comp = rng.integers(0, K, size=shape[:-1])               # (..., H, N)
        head = np.arange(H)[:, None]
        return means[head, comp] + sigma[head, comp] * rng.standard_normal(shape)
    return rng, points, dict(means=means, log_var=log_var, logits=logits)


def direct_form(monkeypatch):
    """Route through the direct-form kernels in every public function of this file."""
    def log_density(x_parts, mix, direct_rows=None):
        parts = routing._parts(x_parts)
        return routing.log_density_direct(np.concatenate(parts) if len(parts) > 1 else parts[0], mix)

    def log_density_backward(dl, x_parts, mix, dx_dtype, direct_rows=None, row_scale=None):
        if row_scale is not None:                                  # dl = row_scale * rows
            dl = row_scale[..., None] * dl
        dx, grads = routing.log_density_backward_direct(dl, routing._parts(x_parts)[0], mix)
        return dx.astype(dx_dtype), grads, None

    for module in (routing, mixing):
        monkeypatch.setattr(module, "route_forward", routing.route_forward_direct)
        monkeypatch.setattr(module, "route_backward", routing.route_backward_direct)
    monkeypatch.setattr(routing, "log_density", log_density)
    monkeypatch.setattr(routing, "log_density_backward", log_density_backward)


def one_ulp(rng, a):
    """Offsets of one ulp of each entry of a, of random sign."""
    return rng.choice([-1.0, 1.0], size=np.shape(a)) * np.spacing(np.abs(a))


def l_offsets(rng, x, mix_inputs):
    """Offsets of one ulp of the terms of each log-density of the points x (..., H, N, d),
    random sign: l = log pi - 1/2 (quad + sum_j log_var + d log 2pi) rounds to a few
    ulps of |log pi| + 1/2 (quad + sum_j |log_var| + d log 2pi), not of |l|, which
    can be much smaller."""
    H, K, d = mix_inputs["means"].shape
    lv = mix_inputs["log_var"]
    lv = lv if lv.ndim == 3 else np.repeat(lv[:, :, None], d, axis=2)        # (H, K, d)
    logits = mix_inputs["logits"]
    log_pi = logits - logsumexp(logits, axis=-1, keepdims=True)              # (H, K)
    const = d * np.log(2 * np.pi) + lv.sum(-1)                               # (H, K)
    l = oracle.evaluate(oracle.log_density, dict(x=x, **mix_inputs))         # (..., H, N, K)
    quad = -2.0 * (l - log_pi[:, None]) - const[:, None]
    terms = np.abs(log_pi)[:, None] + 0.5 * (quad + np.abs(lv).sum(-1)[:, None] + d * np.log(2 * np.pi))
    return one_ulp(rng, terms)


def mixture_roundings(rng, mix_inputs):
    """w_rel and log_pi_offset for the oracle (log_density): one ulp of exp(-log_var) (a
    relative offset of eps / 2 on average) and of log pi, random sign, entry by entry."""
    H, K, d = mix_inputs["means"].shape
    log_pi = mix_inputs["logits"] - logsumexp(mix_inputs["logits"], axis=-1, keepdims=True)
    # pi = exp(log pi) rounds with a relative error up to eps / 2: an offset of eps / 2 of log pi
    return dict(w_rel=rng.choice([-1.0, 1.0], size=(H, K, d)) * EPS / 2,
                log_pi_offset=one_ulp(rng, log_pi) + rng.choice([-1.0, 1.0], size=(H, K)) * EPS / 2)


def compare(label, fast, direct, exact, perturbed):
    """Assert err_fast <= RATIO max(err_direct, floor) for every entry of the dicts
    (name -> result); perturbed() gives a list of the oracle's results with the roundings
    of the module docstring, asked for only where the plain comparison does not already
    pass. Returns the worst ratio."""
    worst = 0.0
    floors = None
    for name, ref in exact.items():
        ref = np.asarray(ref, dtype=np.float64)
        err_fast = float(np.max(np.abs(np.asarray(fast[name], dtype=np.float64) - ref)))
        err_direct = float(np.max(np.abs(np.asarray(direct[name], dtype=np.float64) - ref)))
        allowed = max(err_direct, FLOOR_ULPS * EPS * float(np.max(np.abs(ref))), TINY)
        if err_fast > RATIO * allowed:
            floors = perturbed() if floors is None else floors
            allowed = max([allowed] + [float(np.max(np.abs(np.asarray(f[name]) - ref)))
                                       for f in floors])
        assert err_fast <= RATIO * allowed, (
            f"{label}: {name}: fast path error {err_fast:.3e} > {RATIO} x {allowed:.3e} "
            f"(direct form {err_direct:.3e}, largest |exact| {np.max(np.abs(ref)):.3e})")
        worst = max(worst, err_fast / allowed)
    return worst


def routing_case(seed, width, scale, place, tau, covariance, monkeypatch, N=3):
    """r and its gradients, and the log-likelihood and its gradients, of one regime."""
    rng, points, mix = problem(seed, width, scale, place, covariance)
    H, K, _ = mix["means"].shape
    x = points(H, N, mix["means"].shape[2])
    inputs = dict(x=x, **mix, temperature=tau)
    dr, dll = rng.standard_normal((H, N, K)), rng.standard_normal((H, N))
    label = f"w{width:g}-s{scale:g}-{place}-tau{tau:g}-{covariance}"

    def run():
        r, cache = gma_np.responsibilities_forward(**inputs)
        ll, ll_cache = gma_np.log_likelihood_forward(x, **mix)
        return ({"r": r, **gma_np.responsibilities_backward(dr, cache)},
                {"ll": ll, **gma_np.log_likelihood_backward(dll, ll_cache)})

    def exact(l_offset=None, ddr=0.0, ddll=0.0, **rounded):
        extra = {} if l_offset is None else dict(l_offset=l_offset, **rounded)
        return ({"r": oracle.evaluate(oracle.responsibilities, {**inputs, **extra}),
                 **oracle.gradients(oracle.responsibilities, {**inputs, **extra}, dr + ddr,
                                    ROUTING_GRADS)},
                {"ll": oracle.evaluate(oracle.log_likelihood, dict(x=x, **mix, **extra)),
                 **oracle.gradients(oracle.log_likelihood, dict(x=x, **mix, **extra), dll + ddll,
                                    LIKELIHOOD_GRADS)})

    fast = run()
    with monkeypatch.context() as m:
        direct_form(m)
        direct = run()
    ref = exact()
    draws = [((l_offsets(rng, x, mix), one_ulp(rng, dr), one_ulp(rng, dll)), mixture_roundings(rng, mix))
             for _ in range(FLOOR_SAMPLES)]
    perturbed = []

    def floors(i):
        if not perturbed:
            perturbed.extend(exact(*offsets, **rounded) for offsets, rounded in draws)
        return [p[i] for p in perturbed]
    return max(compare(label + " responsibilities", fast[0], direct[0], ref[0], lambda: floors(0)),
               compare(label + " log_likelihood", fast[1], direct[1], ref[1], lambda: floors(1)))


ROUTING_CASES = list(itertools.product(WIDTHS, SCALES, PLACES, TAUS, COVARIANCES))


@pytest.mark.parametrize("width, scale, place, tau, covariance", ROUTING_CASES,
                         ids=[f"w{w:g}-s{s:g}-{p}-tau{t:g}-{c}" for w, s, p, t, c in ROUTING_CASES])
def test_routing_is_as_accurate_as_the_direct_form(width, scale, place, tau, covariance, monkeypatch):
    seed = ROUTING_CASES.index((width, scale, place, tau, covariance))
    routing_case(seed, width, scale, place, tau, covariance, monkeypatch)


def gma_case(seed, width, scale, place, tau, covariance, causal, norm, monkeypatch, N=4, e=2):
    """The gma output and every gradient of one regime (B = H = 1)."""
    rng, points, mix = problem(seed, width, scale, place, covariance)
    H, K, d = mix["means"].shape
    q, k = points(1, H, N, d), points(1, H, N, d)
    v = rng.standard_normal((1, H, N, e))
    do = rng.standard_normal((1, H, N, e))
    inputs = dict(q=q, k=k, v=v, **mix, temperature=tau)
    options = dict(causal=causal, norm=norm, eps=DEFAULT_EPS)
    label = f"w{width:g}-s{scale:g}-{place}-tau{tau:g}-{covariance}-{norm}-{'causal' if causal else 'bidir'}"

    def run():
        o, cache = gma_np.gma_forward(**inputs, **options)
        return {"o": o, **gma_np.gma_backward(do, cache)}

    def fun(**a):
        return oracle.gma(**a, **options)

    def exact(l_offset=None, ddo=0.0, **rounded):
        args = inputs if l_offset is None else dict(inputs, l_offset=l_offset, **rounded)
        return {"o": oracle.evaluate(fun, args), **oracle.gradients(fun, args, do + ddo, GMA_GRADS)}

    fast = run()
    with monkeypatch.context() as m:
        direct_form(m)
        direct = run()
    draws = [((np.stack([l_offsets(rng, x, mix) for x in (q, k)]), one_ulp(rng, do)),
              mixture_roundings(rng, mix)) for _ in range(FLOOR_SAMPLES)]
    return compare(label, fast, direct, exact(),
                   lambda: [exact(*offsets, **rounded) for offsets, rounded in draws])


# every width and temperature, the other axes taken in turn
GMA_CASES = [(w, SCALES[i % 3], PLACES[(i // 3) % 3], t, COVARIANCES[i % 2], bool(i % 4 // 2),
              ("row", "slot")[i % 3 % 2])
             for i, (w, t) in enumerate(itertools.product(WIDTHS, TAUS))]


@pytest.mark.parametrize("width, scale, place, tau, covariance, causal, norm", GMA_CASES,
                         ids=[f"w{w:g}-s{s:g}-{p}-tau{t:g}-{c}-{n}-{'causal' if ca else 'bidir'}"
                              for w, s, p, t, c, ca, n in GMA_CASES])
def test_gma_is_as_accurate_as_the_direct_form(width, scale, place, tau, covariance, causal, norm,
                                               monkeypatch):
    seed = 1000 + GMA_CASES.index((width, scale, place, tau, covariance, causal, norm))
    gma_case(seed, width, scale, place, tau, covariance, causal, norm, monkeypatch)


@pytest.mark.parametrize("bound", ["EXPANSION_CANCELLATION_BOUND", "GRADIENT_CANCELLATION_BOUND"])
def test_the_sweep_can_fail(bound, monkeypatch):
    """Without either of its direct-form fallbacks (the log-densities, the gradients of the
    tokens near a mean far from the centre) the GEMM routing breaks the rule above, so
    the sweep measures something: points drawn from sharp components far from 0."""
    monkeypatch.setattr(routing, bound, np.inf)
    with pytest.raises(AssertionError, match="fast path error"):
        routing_case(0, -9.0, 1.0, "drawn", 1.0, "diag", monkeypatch)
