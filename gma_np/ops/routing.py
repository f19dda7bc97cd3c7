"""Mixture routing: responsibilities and log-likelihood, forward and backward.

Dimension legend: H heads, N tokens, K components, d feature size; "..." any
leading batch axes (flattened to P inside).

Each head h owns a diagonal Gaussian mixture (definition, section 1):

    l_k(x) = log pi_k - 1/2 sum_j [ (x_j - mu_kj)^2 exp(-log_var_kj) + log_var_kj + log 2pi ]
    r_k(x) = softmax_k( l_k(x) / tau )               responsibilities
    log p(x) = logsumexp_k l_k(x)                    log-likelihood (no tau)

Backward (docs/derivations.md, section 1). With a = l / tau and r = softmax(a):

    da = r * (dr - sum_k r dr)                       softmax Jacobian, row by row
    dl = da / tau
    dtau = -sum da * a / tau = -sum da * log r / tau (sum_k da = 0, so any shift of a per row is free)
    dlogits = dlog_pi - pi * sum_k dlog_pi,   dlog_pi = sum_n dl
and dl flows into x, means and log_var through the quadratic term
(gma_np.kernels.routing._log_density_backward).

All log-sum-exps are scipy.special.logsumexp. Log-densities, responsibilities
inside the cache and every gradient sum are float64 whatever the input dtype
(gma_np._numerics.ACCUM_DTYPE); r and dx come back in the dtype of x.
"""

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from gma_np import _validation as check
from gma_np._numerics import ACCUM_DTYPE, LOG_2PI
from gma_np.kernels.routing import _log_density_backward, _log_density_forward


@dataclass
class Mixture:
    """Mixture parameters of H heads prepared for the kernels (all float64)."""
    means: np.ndarray      # (H, K, d)
    log_var: np.ndarray    # (H, K, d) diag or (H, K) spherical, as given
    inv_var: np.ndarray    # (H, K, d)  exp(-log_var), broadcast over d for spherical
    log_pi: np.ndarray     # (H, K)     log softmax(logits)
    const: np.ndarray      # (H, K)     log pi_k - 1/2 (sum_j log_var_kj + d log 2pi)
    covariance: str        # "diag" or "spherical"
    dtypes: tuple          # dtypes of (means, log_var, logits) as passed, for the gradients


def prepare_mixture(means, log_var, logits):
    """Validate (means, log_var, logits) and precompute what the kernels need."""
    means, log_var, logits, covariance = check.mixture(means, log_var, logits)
    dtypes = (means.dtype, log_var.dtype, logits.dtype)
    mu = means.astype(ACCUM_DTYPE)
    lv = log_var.astype(ACCUM_DTYPE)
    H, K, d = mu.shape
    lv_full = lv if covariance == "diag" else np.broadcast_to(lv[:, :, None], (H, K, d))
    log_pi = logits - logsumexp(logits.astype(ACCUM_DTYPE), axis=-1, keepdims=True)   # (H, K)
    const = log_pi - 0.5 * (lv_full.sum(-1) + d * LOG_2PI)                            # (H, K)
    return Mixture(means=mu, log_var=lv, inv_var=np.ascontiguousarray(np.exp(-lv_full)),
                   log_pi=log_pi, const=const, covariance=covariance, dtypes=dtypes)


def log_density(x4, mix):
    """l (P, H, N, K) float64 of x4 (P, H, N, d) under each head's K components."""
    P, H, N, _ = x4.shape
    out = np.empty((P, H, N, mix.means.shape[1]), dtype=ACCUM_DTYPE)
    _log_density_forward(x4, mix.means, mix.inv_var, mix.const, out)
    return out


def log_density_backward(dl, x4, mix):
    """Gradients of sum(l * dl) for l = log_density(x4, mix).

    dl (P, H, N, K) float64. Returns (dx (P, H, N, d) in x4's dtype, and a dict
    with "means", "log_var", "logits" in the shapes and dtypes that were passed).
    """
    P, H, N, d = x4.shape
    K = mix.means.shape[1]
    dl = np.ascontiguousarray(dl, dtype=ACCUM_DTYPE)
    dx = np.empty_like(x4)
    dmeans_part = np.empty((P, H, K, d), dtype=ACCUM_DTYPE)
    dquad_part = np.empty((P, H, K, d), dtype=ACCUM_DTYPE)
    _log_density_backward(dl, x4, mix.means, mix.inv_var, dx, dmeans_part, dquad_part)
    dl_sum = dl.sum(axis=(0, 2))                                   # (H, K) = sum over p, n
    dmeans = dmeans_part.sum(axis=0)                               # (H, K, d)
    # in the forward pass this was: l = ... - 1/2 sum_j (quad_kj + log_var_kj)
    dlog_var = dquad_part.sum(axis=0) - 0.5 * dl_sum[:, :, None]   # (H, K, d)
    if mix.covariance == "spherical":
        dlog_var = dlog_var.sum(axis=-1)                           # (H, K)
    # in the forward pass this was: log_pi = logits - logsumexp(logits)
    pi = np.exp(mix.log_pi)
    dlogits = dl_sum - pi * dl_sum.sum(axis=-1, keepdims=True)     # (H, K)
    grads = {name: g.astype(dt, copy=False) for name, g, dt in
             zip(("means", "log_var", "logits"), (dmeans, dlog_var, dlogits), mix.dtypes)}
    return dx, grads


@dataclass
class RoutingCache:
    """What responsibilities_backward needs: stored, nothing recomputed but the kernel sums."""
    x4: np.ndarray          # (P, H, N, d) the routed points, flattened leading axes
    lead_shape: tuple       # the leading axes "..." of x
    mix: Mixture
    tau: np.ndarray         # (H,) float64
    tau_per_head: bool      # the caller passed an (H,) temperature
    tau_dtype: np.dtype     # dtype of an array temperature, for its gradient
    r: np.ndarray           # (P, H, N, K) float64 responsibilities
    log_r: np.ndarray       # (P, H, N, K) float64 log responsibilities = a - logsumexp(a)


def route_forward(x4, mix, tau, tau_per_head=False, tau_dtype=np.dtype(np.float64)):
    """Responsibilities of validated x4 (P, H, N, d): (r in float64, cache)."""
    a = log_density(x4, mix) / tau[None, :, None, None]           # (P, H, N, K)
    log_r = a - logsumexp(a, axis=-1, keepdims=True)
    r = np.exp(log_r)
    cache = RoutingCache(x4=x4, lead_shape=x4.shape[:1], mix=mix, tau=tau,
                         tau_per_head=tau_per_head, tau_dtype=tau_dtype, r=r, log_r=log_r)
    return r, cache


def route_backward(dr, cache):
    """Gradients of sum(r * dr) for (r, cache) = route_forward(...). dr (P, H, N, K)."""
    r = cache.r
    # in the forward pass this was: r = softmax_k(a)
    da = r * (dr - (r * dr).sum(axis=-1, keepdims=True))           # (P, H, N, K)
    tau = cache.tau[None, :, None, None]
    # in the forward pass this was: a = l / tau
    dtau = -(da * cache.log_r).sum(axis=(0, 2, 3)) / cache.tau     # (H,)
    dx4, grads = log_density_backward(da / tau, cache.x4, cache.mix)
    grads["temperature"] = (dtau.astype(cache.tau_dtype) if cache.tau_per_head
                            else float(dtau.sum()))
    grads["x"] = dx4
    return grads


def _points(x, mix):
    """Validate x (..., H, N, d) against the mixture; return (x4 (P, H, N, d), lead shape)."""
    x = check.float_array("x", x, min_ndim=3)
    check.mixture_matches("x", x.shape[-3], x.shape[-1], mix.means)
    lead = x.shape[:-3]
    return x.reshape((-1,) + x.shape[-3:]), lead


def responsibilities_forward(x, means, log_var, logits, temperature=1.0):
    """Responsibilities r = softmax_k(l_k(x) / tau) and the cache for the backward.

    Parameters
    ----------
    x : array of shape (..., H, N, d), float32 or float64
    means : array of shape (H, K, d)
    log_var : array of shape (H, K, d) ("diag") or (H, K) ("spherical")
    logits : array of shape (H, K), mixture weights pi = softmax(logits)
    temperature : float > 0, or array of shape (H,)

    Returns
    -------
    r : array of shape (..., H, N, K), dtype of x; rows sum to 1
    cache : RoutingCache
    """
    mix = prepare_mixture(means, log_var, logits)
    x4, lead = _points(x, mix)
    tau, per_head = check.temperature(temperature, mix.means.shape[0])
    tau_dtype = temperature.dtype if isinstance(temperature, np.ndarray) else np.dtype(np.float64)
    r, cache = route_forward(x4, mix, tau, per_head, tau_dtype)
    cache.lead_shape = lead
    return r.astype(x4.dtype).reshape(lead + r.shape[1:]), cache


def responsibilities_backward(dr, cache):
    """Gradients of sum(r * dr) with respect to x, means, log_var, logits and temperature.

    dr has the shape of r (..., H, N, K). Returns a dict keyed "x", "means",
    "log_var", "logits", "temperature", each in the shape (and dtype) passed to
    the forward; "temperature" is a float or an (H,) array as passed.
    """
    expected = cache.lead_shape + cache.r.shape[1:]
    dr = check.float_array("dr", dr)
    check.check_shape("dr", dr, expected, "the shape of r")
    grads = route_backward(dr.reshape(cache.r.shape).astype(ACCUM_DTYPE), cache)
    grads["x"] = grads["x"].reshape(cache.lead_shape + cache.x4.shape[1:])
    return grads


def responsibilities(x, means, log_var, logits, temperature=1.0):
    """r = softmax_k(l_k(x) / tau): x (..., H, N, d) -> r (..., H, N, K). See responsibilities_forward."""
    return responsibilities_forward(x, means, log_var, logits, temperature)[0]


@dataclass
class LogLikelihoodCache:
    x4: np.ndarray          # (P, H, N, d)
    lead_shape: tuple
    mix: Mixture
    posterior: np.ndarray   # (P, H, N, K) float64, softmax_k(l): d logsumexp(l) / dl


def log_likelihood_forward(x, means, log_var, logits):
    """Mixture log-likelihood log p(x) = logsumexp_k l_k(x), and the cache.

    x (..., H, N, d) -> (..., H, N) in the dtype of x. No temperature: this is
    the density of the mixture itself.
    """
    mix = prepare_mixture(means, log_var, logits)
    x4, lead = _points(x, mix)
    l = log_density(x4, mix)                                       # (P, H, N, K)
    ll = logsumexp(l, axis=-1)                                     # (P, H, N)
    posterior = np.exp(l - ll[..., None])
    cache = LogLikelihoodCache(x4=x4, lead_shape=lead, mix=mix, posterior=posterior)
    return ll.astype(x4.dtype).reshape(lead + ll.shape[1:]), cache


def log_likelihood_backward(dll, cache):
    """Gradients of sum(log p(x) * dll): dict "x", "means", "log_var", "logits".

    In the forward pass this was ll = logsumexp_k l_k, so dl = dll * softmax_k(l).
    """
    expected = cache.lead_shape + cache.posterior.shape[1:3]
    dll = check.float_array("dll", dll)
    check.check_shape("dll", dll, expected, "the shape of the log-likelihood")
    dll = dll.reshape(cache.posterior.shape[:3]).astype(ACCUM_DTYPE)
    dx4, grads = log_density_backward(dll[..., None] * cache.posterior, cache.x4, cache.mix)
    grads["x"] = dx4.reshape(cache.lead_shape + cache.x4.shape[1:])
    return grads


def log_likelihood(x, means, log_var, logits):
    """log p(x) = logsumexp_k l_k(x): x (..., H, N, d) -> (..., H, N). See log_likelihood_forward."""
    return log_likelihood_forward(x, means, log_var, logits)[0]
