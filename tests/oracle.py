"""A 60-digit oracle of the definition, for small problems: mpmath on the direct formulas.

Dimension legend: B batch, H heads, N tokens, K components, d query/key size, e value size.

The forward formulas are those of the definition (docs/definition.md, sections 1
and 2), written once more on NumPy arrays of mpmath numbers (dtype object), with
no shift, no centring and no expansion: mpmath numbers have an unbounded
exponent, so exp(-1e6) is just a small number, and at 60 significant digits the
cancellations of the problems the tests use (|l| < 1e12) stay far below the
17th digit. The gradients come from the forwards themselves, by the complex
step, so the oracle depends on no derivation:

    d/dtheta sum(f * df) = Im F(theta + i h) / h + O(h^2 F'''),   h = 1e-40

Every formula is analytic (no max, no abs, no comparison), and the imaginary
part is never the difference of two nearby numbers, so it keeps its 60 digits
relative to the derivative itself, even where the derivative is 1e-150 of the
function (a central difference would lose everything below 1e-60 |F| / h).
Results are rounded to float64 once. The inputs are the float64 values as
given (each converted exactly), so the oracle answers "what is the exact
function at these float64 points", which is what an engine's error is
measured against.

mpmath is an optional test dependency: import this module after
pytest.importorskip("mpmath").
"""

import mpmath
import numpy as np

DIGITS = 60
COMPLEX_STEP = mpmath.mpf(10) ** -40

_exp = np.frompyfunc(mpmath.exp, 1, 1)
_log = np.frompyfunc(mpmath.log, 1, 1)
_mpf = np.frompyfunc(mpmath.mpf, 1, 1)


def _mp(a):
    """A float64 array (or a float) as an object array of exact mpmath numbers."""
    a = np.asarray(a, dtype=np.float64)
    out = np.empty(a.shape, dtype=object)
    out[...] = _mpf(a)
    return out


def _f64(a):
    """An object array of real mpmath numbers rounded once to float64."""
    return np.frompyfunc(float, 1, 1)(a).astype(np.float64)


def _logsumexp(a, axis):
    """log sum exp(a), as written: with an unbounded exponent no shift is needed."""
    return _log(_exp(a).sum(axis=axis, keepdims=True))


def _tau(temperature, H):
    """The temperature as (H,): a scalar repeated, or one per head."""
    return np.broadcast_to(temperature, (H,))


def log_density(x, means, log_var, logits, w_rel=0, log_pi_offset=0):
    """l (..., H, N, K) = log pi_k - 1/2 sum_j [(x_j - mu_kj)^2 exp(-log_var_kj) + log_var_kj + log 2pi].

    w_rel (H, K, d) and log_pi_offset (H, K) perturb exp(-log_var) by a factor 1 + w_rel
    and log pi by an offset (0: the definition), as a float64 method's rounding of them
    would: how the tests measure what those roundings alone do to a result."""
    H, K, d = means.shape
    lv = log_var if log_var.ndim == 3 else np.repeat(log_var[:, :, None], d, axis=2)   # (H, K, d)
    log_pi = logits - _logsumexp(logits, axis=-1) + log_pi_offset                      # (H, K)
    inv_var = _exp(-lv) * (1 + w_rel)                                                  # (H, K, d)
    diff = x[..., :, None, :] - means[:, None, :, :]                                   # (..., H, N, K, d)
    quad = (diff * diff * inv_var[:, None]).sum(-1)                                    # (..., H, N, K)
    return log_pi[:, None, :] - (quad + lv.sum(-1)[:, None, :] + d * mpmath.log(2 * mpmath.pi)) / 2


def responsibilities(x, means, log_var, logits, temperature, l_offset=0, w_rel=0, log_pi_offset=0):
    """r (..., H, N, K) = softmax_k(l / tau) = exp(a - logsumexp_k a), a = l / tau.

    l_offset (..., H, N, K) is added to l (0: the definition), as rounding each
    log-density once to float64 would; w_rel, log_pi_offset: see log_density."""
    l = log_density(x, means, log_var, logits, w_rel, log_pi_offset) + l_offset
    a = l / _tau(temperature, means.shape[0])[:, None, None]
    return _exp(a - _logsumexp(a, axis=-1))


def log_likelihood(x, means, log_var, logits, l_offset=0, w_rel=0, log_pi_offset=0):
    """log p(x) (..., H, N) = logsumexp_k l (the offsets as in responsibilities)."""
    l = log_density(x, means, log_var, logits, w_rel, log_pi_offset) + l_offset
    return _logsumexp(l, axis=-1)[..., 0]


def gma(q, k, v, means, log_var, logits, temperature, *, causal, norm, eps, key_mask=None,
        l_offset=(0, 0), w_rel=0, log_pi_offset=0):
    """o (B, H, N, e) through the N x N affinity (definition, section 2):
    row O = diag(A 1 + eps)^-1 A V with A = R_Q R~_K^T; slot A = R_Q diag(z + eps)^-1 R~_K^T,
    both times the lower-triangular mask L when causal (z then the prefix sums L R~_K).
    l_offset: the offsets of the log-densities of q and of k; w_rel, log_pi_offset: see
    log_density."""
    B, H, N, _ = q.shape
    rq = responsibilities(q, means, log_var, logits, temperature, l_offset[0], w_rel, log_pi_offset)
    rk = responsibilities(k, means, log_var, logits, temperature, l_offset[1], w_rel, log_pi_offset)
    if key_mask is not None:
        rk = rk * np.asarray(key_mask, dtype=np.int64)[:, None, :, None]
    L = np.tril(np.ones((N, N), dtype=np.int64)) if causal else np.ones((N, N), dtype=np.int64)
    eps = mpmath.mpf(eps)
    o = np.empty(v.shape, dtype=object)
    for b in range(B):
        for h in range(H):
            if norm == "slot":
                W = 1 / (L.dot(rk[b, h]) + eps)                                         # (N, K) 1 / (z_i + eps)
                o[b, h] = ((rq[b, h] * W).dot(rk[b, h].T) * L).dot(v[b, h])
            else:
                A = rq[b, h].dot(rk[b, h].T) * L                                        # (N, N)
                o[b, h] = A.dot(v[b, h]) / (A.sum(1)[:, None] + eps)
    return o


def evaluate(fun, inputs):
    """fun(**inputs) at 60 digits, rounded once to float64. inputs: float64 arrays or floats."""
    with mpmath.workdps(DIGITS):
        return _f64(fun(**{n: _mp(a) for n, a in inputs.items()}))


def gradients(fun, inputs, cotangent, wrt):
    """{name: gradient of sum(fun(**inputs) * cotangent) with respect to inputs[name]} for the
    names in wrt, by the complex step at 60 digits, rounded once to float64 (in the shape of
    the input; a float for a scalar input). One evaluation of fun per element."""
    with mpmath.workdps(DIGITS):
        args = {n: _mp(a) for n, a in inputs.items()}
        dy = _mp(cotangent)
        step = mpmath.mpc(0, COMPLEX_STEP)
        out = {}
        for name in wrt:
            base = args[name]
            grad = np.empty(base.shape, dtype=object)
            for idx in np.ndindex(base.shape):
                moved = base.copy()
                moved[idx] = moved[idx] + step
                grad[idx] = (fun(**{**args, name: moved}) * dy).sum().imag / COMPLEX_STEP
            out[name] = _f64(grad) if grad.ndim else float(grad[()])
        return out
