"""Routing: responsibilities and log-likelihood against the naive broadcast form, an
independent scipy.stats mixture posterior, and central finite differences."""

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

import gma_np
from gma_np.mixers.gma.reference.routing import (
    log_likelihood_naive,
    responsibilities_backward_naive,
    responsibilities_naive,
)
from tests.conftest import assert_close

COVARIANCES = ["diag", "spherical"]


def mixture(rng, H, K, d, covariance, scale=1.0, spread=0.3):
    means = scale * rng.standard_normal((H, K, d))
    shape = (H, K, d) if covariance == "diag" else (H, K)
    log_var = 2 * np.log(scale) + spread * rng.standard_normal(shape)
    logits = 0.5 * rng.standard_normal((H, K))
    return means, log_var, logits


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("lead", [(), (2,), (2, 3)], ids=lambda s: f"lead{s}")
@pytest.mark.parametrize("per_head", [False, True], ids=["tau", "tauH"])
def test_responsibilities_match_naive(rng, covariance, lead, per_head):
    H, N, K, d = 3, 37, 5, 4
    means, log_var, logits = mixture(rng, H, K, d, covariance)
    tau = rng.uniform(0.3, 2.0, H) if per_head else 0.7
    x = rng.standard_normal(lead + (H, N, d))
    r = gma_np.responsibilities(x, means, log_var, logits, temperature=tau)
    assert r.shape == lead + (H, N, K)
    assert_close("r", r, responsibilities_naive(x, means, log_var, logits, tau), 1e-12)
    assert_close("row sums", r.sum(-1), np.ones(lead + (H, N)), 1e-14)
    ll = gma_np.log_likelihood(x, means, log_var, logits)
    assert_close("log_likelihood", ll, log_likelihood_naive(x, means, log_var, logits), 1e-13)


def scipy_posterior(x, means, var, weights):
    """Posterior of a diagonal Gaussian mixture by scipy.stats, one head: x (N, d)."""
    logp = np.stack([stats.multivariate_normal(means[k], np.diag(var[k])).logpdf(x)
                     for k in range(len(weights))], axis=-1) + np.log(weights)
    return np.exp(logp - logsumexp(logp, axis=-1, keepdims=True)), logsumexp(logp, axis=-1)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("scale", [1.0, 20.0, 0.05], ids=lambda s: f"scale{s}")
def test_temperature_one_is_the_mixture_posterior(rng, covariance, scale):
    """At tau = 1, r is the posterior of the same mixture, computed independently (1e-12)."""
    H, K, d, N = 2, 5, 3, 41
    means, log_var, logits = mixture(rng, H, K, d, covariance, scale=scale)
    # points drawn from the mixture itself, so that every component matters
    comp = rng.integers(0, K, size=(H, N))
    var = np.exp(log_var) if covariance == "diag" else np.exp(log_var)[..., None] * np.ones(d)
    x = np.stack([means[h, comp[h]] + np.sqrt(var[h, comp[h]]) * rng.standard_normal((N, d))
                  for h in range(H)])                                  # (H, N, d)
    r = gma_np.responsibilities(x, means, log_var, logits, temperature=1.0)
    ll = gma_np.log_likelihood(x, means, log_var, logits)
    weights = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    for h in range(H):
        post, logp = scipy_posterior(x[h], means[h], var[h], weights[h])
        np.testing.assert_allclose(r[h], post, rtol=0, atol=1e-12, err_msg=f"r, head {h}")
        assert_close(f"log_likelihood head {h}", ll[h], logp, 1e-12)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("per_head", [False, True], ids=["tau", "tauH"])
def test_responsibilities_backward_gradcheck(rng, covariance, per_head):
    H, N, K, d = 2, 7, 3, 3
    means, log_var, logits = mixture(rng, H, K, d, covariance)
    inputs = dict(x=rng.standard_normal((2, H, N, d)), means=means, log_var=log_var,
                  logits=logits, temperature=rng.uniform(0.5, 1.5, H) if per_head else 0.8)

    def grad(dr, **a):
        return gma_np.responsibilities_backward(dr, gma_np.responsibilities_forward(**a)[1])

    report = gma_np.gradcheck(gma_np.responsibilities, grad, inputs, mode="full")
    assert report.ok, report
    assert {c.name for c in report.inputs} == set(inputs)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_responsibilities_backward_matches_naive(rng, covariance):
    H, N, K, d = 3, 37, 5, 4
    means, log_var, logits = mixture(rng, H, K, d, covariance)
    tau = rng.uniform(0.5, 1.5, H)
    x = rng.standard_normal((2, H, N, d))
    r, cache = gma_np.responsibilities_forward(x, means, log_var, logits, tau)
    dr = rng.standard_normal(r.shape)
    got = gma_np.responsibilities_backward(dr, cache)
    ref = responsibilities_backward_naive(dr, x, means, log_var, logits, tau)
    for name in ref:
        assert_close(name, got[name], ref[name], 1e-11)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_log_likelihood_backward_gradcheck(rng, covariance):
    H, N, K, d = 2, 7, 3, 3
    means, log_var, logits = mixture(rng, H, K, d, covariance)
    inputs = dict(x=rng.standard_normal((H, N, d)), means=means, log_var=log_var, logits=logits)

    def grad(dll, **a):
        return gma_np.log_likelihood_backward(dll, gma_np.log_likelihood_forward(**a)[1])

    report = gma_np.gradcheck(gma_np.log_likelihood, grad, inputs, mode="full")
    assert report.ok, report


def test_temperature_gradient_shape_follows_input(rng):
    H, N, K, d = 3, 5, 4, 2
    means, log_var, logits = mixture(rng, H, K, d, "diag")
    x = rng.standard_normal((H, N, d))
    for tau, kind in ((0.9, float), (np.array([0.5, 1.0, 2.0]), np.ndarray)):
        r, cache = gma_np.responsibilities_forward(x, means, log_var, logits, tau)
        g = gma_np.responsibilities_backward(np.ones_like(r), cache)
        assert isinstance(g["temperature"], kind)
        assert np.shape(g["temperature"]) == np.shape(tau)


def test_float32_direct_form_survives_far_offsets(rng):
    """Points near their component but 1000 away from the origin: the float32 responsibilities
    equal the float64 ones on the same values (the matmul expansion would lose every digit)."""
    H, N, K, d = 1, 64, 4, 8
    offset = 1000.0
    means = offset + rng.standard_normal((H, K, d))
    log_var = np.full((H, K, d), np.log(0.25))
    logits = np.zeros((H, K))
    x = means[0, rng.integers(0, K, N)][None] + 0.5 * rng.standard_normal((H, N, d))
    x32, means32 = x.astype(np.float32), means.astype(np.float32)
    r32 = gma_np.responsibilities(x32, means32, log_var.astype(np.float32), logits.astype(np.float32))
    r64 = gma_np.responsibilities(x32.astype(np.float64), means32.astype(np.float64), log_var, logits)
    assert r32.dtype == np.float32
    np.testing.assert_allclose(r32, r64, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 0, 4), (2, 2, 0, 4), (2, 3, 2, 0, 4), (0, 2, 5, 4)],
                         ids=["N0", "lead-N0", "two-lead-N0", "lead0"])
def test_no_points_give_empty_outputs_and_zero_parameter_gradients(shape):
    """N = 0 or an empty leading axis: r and log p of shape (..., 0 ...), and every
    parameter gradient zero (nothing was routed), not a reshape error."""
    H, K, d = 2, 3, 4
    rng = np.random.default_rng(0)
    means, log_var, logits = (rng.standard_normal((H, K, d)), 0.1 * rng.standard_normal((H, K, d)),
                              rng.standard_normal((H, K)))
    x = np.zeros(shape)
    r, cache = gma_np.responsibilities_forward(x, means, log_var, logits, temperature=0.7)
    assert r.shape == shape[:-1] + (K,)
    g = gma_np.responsibilities_backward(np.ones(r.shape), cache)
    assert g["x"].shape == shape and g["temperature"] == 0.0
    ll, cache = gma_np.log_likelihood_forward(x, means, log_var, logits)
    assert ll.shape == shape[:-1]
    g2 = gma_np.log_likelihood_backward(np.ones(ll.shape), cache)
    for grads in (g, g2):
        for name in ("means", "log_var", "logits"):
            np.testing.assert_array_equal(grads[name], np.zeros_like(grads[name]), err_msg=name)
