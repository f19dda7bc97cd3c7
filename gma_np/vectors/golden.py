"""The tensors of one golden case and their tolerances.

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K components, P the number of memory positions stored.

For one case (gma_np.vectors.cases) this computes, in float64:

    intermediates  log_density_q, log_density_k (B, H, N, K)   l_k(x), no temperature
                   r_q, r_k (B, H, N, K)                       responsibilities, r_k unmasked
                   memory_positions (P,), memory_S (B, H, P, K, e), memory_z (B, H, P, K)
    output         o (B, H, N, e)
    gradients      dq, dk, dv, dmeans, dlog_var, dlogits, dtemperature of sum(o * do)

The intermediates come from gma_np.mixers.gma.reference and
gma_np.memory.reference (the plain-NumPy definition), the output and gradients
from the public gma_forward / gma_backward, so the bundle is the library's own
answer, checked against the references by the library's tests (dtemperature is the
shifted form of docs/derivations.md, section 2).

Tolerances (docs/vectors.md, "Tolerances"): a port computing in unit
roundoff u passes tensor T when

    max|T_port - T| / max|T| <= LAMBDA * u * (kappa_T * (sqrt(n_T) + sqrt(d + e + K)) + E_T)

First term: the rounding of a sum of n terms is a relative perturbation of
its terms of at most lambda sqrt(n) u with probability >= 1 - 2n exp(-lambda^2/2)
(Higham & Mary 2019, rounding errors modelled as independent); to first order
it moves T by kappa_T times that. n_T is the longest sum behind T (N for the
memory and every per-token tensor, 2 B N for the parameter gradients, d for
the routing); sqrt(d + e + K) covers the fixed-length sums. kappa_T is
measured, not guessed: the largest relative change of T when every input and
the cotangent are perturbed by random relative amounts of size PERTURBATION
(log_var and logits by absolute amounts: they enter through exp), over
KAPPA_SAMPLES draws, never below 1 (statistical condition estimation, Kenney
& Laub 1994).

Second term, E_T = max_i E_T,i / (u max|T|) from rounding_bounds: the errors
no input perturbation reproduces, because they break an identity that holds
exactly for any inputs. The computed responsibilities carry a relative error
of about sqrt(d + 4) u times the size of the terms of l / tau, and the
computed da = r (dr - sum_k r dr) no longer sums to zero over k; every
routing gradient is a sum of da times something, and d tau, in the form
-sum da a / tau that autodiff computes, multiplies it by a = l / tau, whose
large common part the exact formula never sees (trap 6 of docs/port-guide.md;
gma_np takes the row maximum out, -sum da (a - max_k a) / tau,
docs/derivations.md, section 2). These are bounded element by element with
absolute values and added as root sums of squares; the d tau bound uses the
unshifted factor |a|, so that a port of either form passes.
"""

import math
import zlib

import numpy as np
from scipy.special import logsumexp

from gma_np._numerics import LOG_2PI
from gma_np.mixers.gma.configurations import GRADIENT_NAMES
from gma_np.memory.reference import causal_mix_loop
from gma_np.mixers.gma.mixing import gma_backward, gma_forward
from gma_np.mixers.gma.reference.routing import log_density_naive, responsibilities_naive
from gma_np.vectors.cases import draw_inputs

# Unit roundoff of each dtype a port may compute in.
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24}
# lambda of the probabilistic bound: 2 n exp(-lambda^2 / 2) < 1e-8 for every n <= 1e5 at
# lambda = 8, so a correct port fails a tensor by bad luck with negligible probability;
# the rest of lambda is margin for the statistical estimate of kappa (3 draws).
LAMBDA = 8.0
# Relative size of the input perturbations that measure kappa: far above float64
# rounding (1e-16, so the measured change is not noise) and far below the
# scale on which GMA is non-linear (so the change is first order).
PERTURBATION = 1e-7
# Random perturbations per case; the estimate is the largest of them.
KAPPA_SAMPLES = 3

INPUTS = GRADIENT_NAMES            # every input of gma is differentiable, in this order
# Inputs perturbed by absolute rather than relative amounts: they enter through exp,
# where a relative rounding error of exp(x) is an absolute error of x.
ABSOLUTE_PERTURBATION = ("log_var", "logits")
INTERMEDIATES = ("log_density_q", "log_density_k", "r_q", "r_k", "memory_S", "memory_z")
OUTPUTS = ("o",)
GRADIENTS = tuple("d" + name for name in INPUTS)
CHECKED = INTERMEDIATES + OUTPUTS + GRADIENTS


def memory_positions(N, causal):
    """Token positions t at which the memory S_t, z_t is stored.

    Causal: the first token, the middle one and the last one. Bidirectional:
    the memory is the same for every query, stored once as position N - 1
    (the sum over all keys).
    """
    if not causal:
        return np.array([N - 1], dtype=np.int64)
    return np.unique(np.array([0, N // 2, N - 1], dtype=np.int64))


def gma_kwargs(case, inputs, mask):
    """Keyword arguments of gma for this case (temperature a float when scalar)."""
    tau = inputs["temperature"]
    return dict(causal=case.causal, norm=case.norm, eps=case.eps, key_mask=mask,
                temperature=tau if case.per_head else float(tau))


def compute_tensors(case, inputs, mask, do):
    """Every checked tensor of one case, float64: dict name -> array (see module docstring)."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    mix = (inputs["means"], inputs["log_var"], inputs["logits"])
    kw = gma_kwargs(case, inputs, mask)
    out = {}
    # intermediates, from the plain-NumPy reference
    out["log_density_q"] = log_density_naive(q, *mix)                          # (B, H, N, K)
    out["log_density_k"] = log_density_naive(k, *mix)                          # (B, H, N, K)
    out["r_q"] = responsibilities_naive(q, *mix, kw["temperature"])            # (B, H, N, K)
    out["r_k"] = responsibilities_naive(k, *mix, kw["temperature"])            # (B, H, N, K)
    m = np.ones((case.B, case.N)) if mask is None else mask.astype(np.float64)
    rk_masked = out["r_k"] * m[:, None, :, None]                               # R~_K
    pos = memory_positions(case.N, case.causal)
    S = np.empty((case.B, case.H, len(pos), case.K, case.e))                   # (B, H, P, K, e)
    z = np.empty((case.B, case.H, len(pos), case.K))                           # (B, H, P, K)
    for b in range(case.B):
        for h in range(case.H):
            for i, t in enumerate(pos):
                _, S[b, h, i], z[b, h, i] = causal_mix_loop(
                    out["r_q"][b, h, :t + 1], rk_masked[b, h, :t + 1], v[b, h, :t + 1],
                    case.norm == "slot", case.eps)
    out["memory_S"], out["memory_z"] = S, z
    # output and gradients, from the public API
    o, cache = gma_forward(q, k, v, *mix, **kw)
    out["o"] = o                                                               # (B, H, N, e)
    grads = gma_backward(do, cache)
    for name in INPUTS:
        out["d" + name] = np.asarray(grads[name], dtype=np.float64)
    return out


def n_terms(name, case):
    """Length of the longest floating-point sum behind tensor `name`."""
    if name in ("log_density_q", "log_density_k", "r_q", "r_k"):
        return case.d
    if name in ("dmeans", "dlog_var", "dlogits", "dtemperature"):
        return 2 * case.B * case.N
    return case.N        # memory, o, dq, dk, dv: prefix or suffix sums over tokens


def _scale(x):
    """max |x|, or 1 for an all-zero tensor (then the tolerance is absolute)."""
    s = float(np.abs(x).max()) if x.size else 0.0
    return s if s > 0.0 else 1.0


def estimate_kappa(case, inputs, mask, do, tensors, seed):
    """kappa_T of every checked tensor: max relative change under random input perturbations."""
    rng = np.random.default_rng([seed, zlib.crc32(case.name.encode("ascii")), 1])
    kappa = {name: 1.0 for name in CHECKED}
    for _ in range(KAPPA_SAMPLES):
        pert = {}
        for name, x in inputs.items():
            xi = rng.uniform(-1.0, 1.0, np.shape(x))
            if name in ABSOLUTE_PERTURBATION:
                pert[name] = x + PERTURBATION * xi
            else:
                pert[name] = x * (1.0 + PERTURBATION * xi)
        pert_do = do * (1.0 + PERTURBATION * rng.uniform(-1.0, 1.0, do.shape))
        moved = compute_tensors(case, pert, mask, pert_do)
        for name in CHECKED:
            change = float(np.abs(moved[name] - tensors[name]).max()) if tensors[name].size else 0.0
            kappa[name] = max(kappa[name], change / (PERTURBATION * _scale(tensors[name])))
    return kappa


def routing_cotangents(case, rq, rk_masked, v, do):
    """drq, drk (B, H, N, K): the gradients of sum(o * do) with respect to the routed
    queries R_Q and the masked routed keys R~_K, in float64, by the memory form."""
    B, H, N, K = rq.shape
    e = v.shape[-1]
    if case.causal:
        S = np.cumsum(rk_masked[..., None] * v[..., None, :], axis=2)          # (B, H, N, K, e)
        z = np.cumsum(rk_masked, axis=2)                                       # (B, H, N, K)
    else:
        S = np.broadcast_to(np.einsum("bhnk,bhne->bhke", rk_masked, v)[:, :, None], (B, H, N, K, e))
        z = np.broadcast_to(rk_masked.sum(2)[:, :, None], (B, H, N, K))
    if case.norm == "row":
        den = (rq * z).sum(-1) + case.eps                                      # (B, H, N)
        o = np.einsum("bhnk,bhnke->bhne", rq, S) / den[..., None]
        dnum, dden = do / den[..., None], -(do * o).sum(-1) / den
        drq = np.einsum("bhne,bhnke->bhnk", dnum, S) + dden[..., None] * z
        dS, dz = rq[..., None] * dnum[..., None, :], rq * dden[..., None]
    else:
        inv = 1.0 / (z + case.eps)
        sdot = np.einsum("bhnke,bhne->bhnk", S, do)
        drq = sdot * inv
        dS, dz = (rq * inv)[..., None] * do[..., None, :], -rq * sdot * inv * inv
    if case.causal:
        G = np.flip(np.cumsum(np.flip(dS, 2), axis=2), 2)                      # suffix sums
        g = np.flip(np.cumsum(np.flip(dz, 2), axis=2), 2)
    else:
        G, g = dS.sum(2, keepdims=True), dz.sum(2, keepdims=True)
    drk = np.einsum("bhnke,bhne->bhnk", np.broadcast_to(G, dS.shape), v) + g
    return drq, drk


def rounding_bounds(case, inputs, mask, do, tensors):
    """Per-element error bounds E_T / u of the routing and of what flows through its backward.

    Returns a dict: log_density_q/k, r_q/r_k (B, H, N, K), dq, dk (B, H, N, d),
    dmeans, dlog_var, dlogits (the shapes of the parameters) and dtemperature
    ((H,) or a scalar). The tensors not listed (memory, o, dv) have E_T = 0.

    1. l_k(x) is a sum of d + 3 terms: error about sqrt(d + 4) u terms_k, terms_k
       the sum of their absolute values; so r_k = softmax(l / tau)_k has a relative
       error eps_k = sqrt(d + 4) u (terms_k + sum_k' r_k' terms_k') / tau.
    2. da = r (dr - s), s = sum_k r dr, is computed with an error up to
       u [r (|dr| + sum_k r |dr|) + eps_k r_k |dr_k - s| + r_k sum_k' eps_k' r_k' |dr_k'|],
       however small da itself is (it vanishes as r collapses, the rounding does not).
    3. Every routing gradient is a sum of da times something; bounding the
       something by its absolute value and adding the independent errors as a
       root sum of squares gives E_T. d tau multiplies da by a = l / tau, which
       can be large: ports that write d tau = -sum da a / tau (what autodiff
       does) see this term in full; ports that take a constant of each row out
       of a first see much less of it: gma_np uses the row maximum,
       d tau = -sum da (a - max_k a) / tau (docs/derivations.md, section 2),
       and log r = a - logsumexp(a) does as well. The bound is the one of the
       unshifted form, |a|, so that a port of either form passes.
    """
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    means, log_var, logits = inputs["means"], inputs["log_var"], inputs["logits"]
    H, K, d = means.shape
    tau = np.broadcast_to(inputs["temperature"], (H,))[:, None, None]         # (H, 1, 1)
    m = np.ones((case.B, case.N)) if mask is None else mask.astype(np.float64)
    rq, rk = tensors["r_q"], tensors["r_k"]
    drq, drk = routing_cotangents(case, rq, rk * m[:, None, :, None], v, do)
    drk = drk * m[:, None, :, None]
    lv = log_var if log_var.ndim == 3 else np.repeat(log_var[:, :, None], d, axis=2)
    sq = {"dmeans": 0.0, "dlog_var": 0.0, "dlog_pi": 0.0, "dtemperature": 0.0}
    bounds = {}
    pi = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    lv_terms = 0.5 * (np.abs(lv).sum(-1) + d * LOG_2PI) + np.abs(np.log(pi))  # (H, K)
    for x, r, dr, l, dx_name in ((q, rq, drq, tensors["log_density_q"], "dq"),
                                 (k, rk, drk, tensors["log_density_k"], "dk")):
        diff = x[..., :, None, :] - means[:, None, :, :]                       # (B, H, N, K, d)
        w = np.abs(diff) * np.exp(-lv)[:, None]                                # |x - mu| / sigma^2
        # terms: the sum of the absolute terms of a_k = l_k / tau. a_k is computed with an
        # error of about sqrt(d + 4) u terms_k (d + 3 terms and a division, errors adding up
        # like a random walk, lambda covers the tail), so r_k = softmax(a)_k with a relative
        # error up to eps_k = sqrt(d + 4) u (terms_k + sum_k' r_k' terms_k').
        terms = (0.5 * (np.abs(diff) * w).sum(-1) + lv_terms[:, None]) / tau   # (B, H, N, K)
        eps_r = math.sqrt(d + 4) * (terms + (r * terms).sum(-1, keepdims=True))
        # the routing itself: l (= a tau) and r = r(1 + eps_r), element by element
        bounds["log_density_" + dx_name[1]] = (
            math.sqrt(d + 4) * terms * tau)
        bounds["r_" + dx_name[1]] = r * eps_r
        # da = r (dr - s), s = sum_k r dr: its own rounding, u r (|dr| + sum_k r |dr|), plus
        # what the error of r makes of it, u (eps_k r_k |dr_k - s| + r_k sum_k' eps_k' r_k' |dr_k'|)
        abs_dr = np.abs(dr)
        s = (r * dr).sum(-1, keepdims=True)
        da_abs = (r * (abs_dr + (r * abs_dr).sum(-1, keepdims=True))
                  + eps_r * r * np.abs(dr - s) + r * (eps_r * r * abs_dr).sum(-1, keepdims=True))
        # every gradient below is a sum of (error of da) x (something): the errors are
        # independent and of either sign, so they add as a root sum of squares (lambda
        # covers the tail), with the something bounded by its absolute value
        dl2 = (da_abs / tau) ** 2                                              # (B, H, N, K)
        sq[dx_name] = (dl2[..., None] * w ** 2).sum(-2)                        # (B, H, N, d)
        sq["dmeans"] = sq["dmeans"] + (dl2[..., None] * w ** 2).sum(axis=(0, 2))
        dlv = 0.25 * (dl2[..., None] * (np.abs(diff) * w + 1.0) ** 2).sum(axis=(0, 2))
        sq["dlog_var"] = sq["dlog_var"] + (dlv if log_var.ndim == 3 else dlv.sum(-1))
        sq["dlog_pi"] = sq["dlog_pi"] + dl2.sum(axis=(0, 2))                   # (H, K)
        # dtemperature = -sum da a / tau in the unshifted form a port may use: rounding
        # breaks sum_k da = 0 and the broken sum meets the common part of a, which the
        # exact formula never sees; |a| bounds it (a shifted form sees less)
        sq["dtemperature"] = sq["dtemperature"] + (dl2 * (l / tau) ** 2).sum(axis=(0, 2, 3))
    if not case.per_head:
        sq["dtemperature"] = sq["dtemperature"].sum()
    bounds.update({name: np.sqrt(x) for name, x in sq.items()})
    dlog_pi = bounds.pop("dlog_pi")
    # in the forward pass this was: log_pi = logits - logsumexp(logits)
    bounds["dlogits"] = dlog_pi + pi * dlog_pi.sum(-1, keepdims=True)          # (H, K)
    return bounds


def tolerance(kappa, n, case, dtype, bound=0.0):
    """Largest allowed max|T_port - T| / max|T| for a port computing in `dtype`.

    bound is max_i E_T,i / (u scale_T) of the softmax-backward term (0 for the
    tensors it does not reach).
    """
    fixed = math.sqrt(case.d + case.e + case.K)
    return LAMBDA * UNIT_ROUNDOFF[dtype] * (kappa * (math.sqrt(n) + fixed) + bound)


def golden_case(case, seed):
    """Everything the bundle stores for one case.

    Returns (arrays, meta): arrays maps each stored name to its array (the order
    is the order of the .npz entries); meta maps each checked tensor to its
    scale, kappa, n_terms and tolerance per dtype.
    """
    inputs, mask, do = draw_inputs(case, seed)
    tensors = compute_tensors(case, inputs, mask, do)
    kappa = estimate_kappa(case, inputs, mask, do, tensors, seed)
    bounds = rounding_bounds(case, inputs, mask, do, tensors)
    arrays = {}
    for name in INPUTS:
        arrays[name] = inputs[name]
    key_mask = np.ones((case.B, case.N), dtype=np.uint8) if mask is None else mask.astype(np.uint8)
    arrays["key_mask"] = key_mask
    arrays["do"] = do
    for name in INPUTS + ("do",):
        arrays[name + "_f32"] = arrays[name].astype(np.float32)
    arrays["memory_positions"] = memory_positions(case.N, case.causal)
    meta = {}
    for name in CHECKED:
        arrays[name] = tensors[name]
        n = n_terms(name, case)
        scale = _scale(tensors[name])
        bound = float(np.max(bounds[name])) / scale if name in bounds else 0.0
        meta[name] = dict(scale=scale, kappa=kappa[name], n_terms=n, rounding_bound=bound,
                          tol={dt: tolerance(kappa[name], n, case, dt, bound)
                               for dt in UNIT_ROUNDOFF})
    return arrays, meta
