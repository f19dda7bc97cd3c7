"""An independent port of GMA in plain NumPy, in the port form of docs/vectors.md.

It imports nothing from gma_np: it is what a port to another array library
looks like, written from docs/definition.md alone, and it is what the tests
check the golden-vector bundle and its checker against (tests/test_vectors.py).

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K components.

It computes in the dtype of its inputs, everything included: float32 inputs
mean float32 log-densities, float32 prefix sums (np.cumsum, sequential) and
float32 gradient sums. That makes it the "independent float32 implementation"
whose measured error the tolerances of the bundle must cover. The memory is
materialised per token, S_t (B, H, N, K, e), which is simple and fine for
tests; a real port scans instead.

    gma(q, k, v, means, log_var, logits, *, causal, norm, temperature, eps, key_mask) -> o
    gma_backward(do, q, k, v, means, log_var, logits, *, same keywords) -> dict
    responsibilities(x, means, log_var, logits, temperature) -> r

leak_future=True makes the classic causal bug on purpose: query t reads the
memory after token t + 1 (one future token leaks). The tests check that the
bundle catches it.
"""

import math

import numpy as np
from scipy.special import logsumexp

LOG_2PI = math.log(2.0 * math.pi)


def _tau(temperature, H, dtype):
    """temperature (float or (H,)) -> (H, 1, 1) in dtype, to divide (..., H, N, K) arrays."""
    return np.broadcast_to(np.asarray(temperature, dtype=dtype), (H,)).reshape(H, 1, 1)


def _mixture(means, log_var, logits):
    """(inverse variances (H, K, d), log weights (H, K), constant (H, K)) in the input dtype."""
    H, K, d = means.shape
    lv = log_var if log_var.ndim == 3 else np.repeat(log_var[:, :, None], d, axis=2)   # (H, K, d)
    inv_var = np.exp(-lv)
    log_pi = logits - logsumexp(logits, axis=-1, keepdims=True)                        # (H, K)
    const = log_pi - 0.5 * (lv.sum(-1) + d * LOG_2PI)                                  # (H, K)
    return inv_var, log_pi, const.astype(means.dtype)


def log_density(x, means, log_var, logits):
    """l (..., H, N, K) = log pi_k + log N(x; mu_k, diag exp(log_var_k))."""
    inv_var, _, const = _mixture(means, log_var, logits)
    diff = x[..., :, None, :] - means[:, None, :, :]                   # (..., H, N, K, d)
    quad = (diff * diff * inv_var[:, None]).sum(-1)                    # (..., H, N, K)
    return const[:, None, :] - 0.5 * quad


def responsibilities(x, means, log_var, logits, temperature=1.0):
    """r (..., H, N, K) = softmax_k(l_k(x) / tau), through a max-shifted log-sum-exp."""
    a = log_density(x, means, log_var, logits) / _tau(temperature, means.shape[0], x.dtype)
    return np.exp(a - logsumexp(a, axis=-1, keepdims=True))


def _memory(rk, v, causal):
    """S_t (B, H, N, K, e) and z_t (B, H, N, K): what query t reads."""
    B, H, N, K = rk.shape
    e = v.shape[-1]
    if causal:
        S = np.cumsum(rk[..., :, None] * v[..., None, :], axis=2)      # prefix sums over t
        z = np.cumsum(rk, axis=2)
    else:
        S = np.broadcast_to(np.einsum("bhnk,bhne->bhke", rk, v)[:, :, None], (B, H, N, K, e))
        z = np.broadcast_to(rk.sum(axis=2)[:, :, None], (B, H, N, K))
    return S, z


def _forward(q, k, v, means, log_var, logits, causal, norm, temperature, eps, key_mask,
             leak_future=False):
    B, H, N, _ = q.shape
    dtype = q.dtype
    mask = (np.ones((B, N), dtype=dtype) if key_mask is None
            else np.asarray(key_mask).astype(dtype))                   # (B, N)
    rq = responsibilities(q, means, log_var, logits, temperature)      # (B, H, N, K)
    rk = responsibilities(k, means, log_var, logits, temperature) * mask[:, None, :, None]
    S, z = _memory(rk, v, causal)
    if leak_future and causal:
        # THE BUG: query t reads S_{t+1}, z_{t+1}
        S = np.concatenate([S[:, :, 1:], S[:, :, -1:]], axis=2)
        z = np.concatenate([z[:, :, 1:], z[:, :, -1:]], axis=2)
    if norm == "row":
        den = (rq * z).sum(-1) + dtype.type(eps)                       # (B, H, N)
        o = np.einsum("bhnk,bhnke->bhne", rq, S) / den[..., None]
    elif norm == "slot":
        o = np.einsum("bhnk,bhnke->bhne", rq / (z + dtype.type(eps)), S)
    else:
        raise ValueError(f"norm: expected 'row' or 'slot', got {norm!r}")
    return o, (rq, rk, mask, S, z)


def gma(q, k, v, means, log_var, logits, *, causal=False, norm="row", temperature=1.0,
        eps=1e-6, key_mask=None, leak_future=False):
    """o (B, H, N, e) in the dtype of q."""
    return _forward(q, k, v, means, log_var, logits, causal, norm, temperature, eps, key_mask,
                    leak_future)[0]


def _routing_backward(dr, x, means, log_var, logits, temperature, tau_from_log_r=False):
    """Gradients of sum(r * dr) for r = responsibilities(x, ...): dx and the mixture's.

    d tau = -sum da a / tau (what autodiff computes), or with tau_from_log_r
    -sum da log r / tau: equal exactly (sum_k da = 0), not in floating point
    (docs/port-guide.md, trap 6).
    """
    H, K, d = means.shape
    dtype = x.dtype
    inv_var, log_pi, _ = _mixture(means, log_var, logits)
    tau = _tau(temperature, H, dtype)
    a = log_density(x, means, log_var, logits) / tau                   # (B, H, N, K)
    r = np.exp(a - logsumexp(a, axis=-1, keepdims=True))
    # r = softmax(a):  da = r (dr - sum_k r dr)
    da = r * (dr - (r * dr).sum(-1, keepdims=True))
    # a = l / tau
    shift = logsumexp(a, axis=-1, keepdims=True) if tau_from_log_r else 0
    dtau = -(da * (a - shift)).sum(axis=(0, 2, 3)) / tau[:, 0, 0]      # (H,)
    dl = da / tau                                                      # (B, H, N, K)
    # l = log_pi - 1/2 (sum_j (x - mu)^2 inv_var + sum_j log_var + d log 2pi)
    diff = x[..., :, None, :] - means[:, None, :, :]                   # (B, H, N, K, d)
    w = diff * inv_var[:, None]                                        # (x - mu) / sigma^2
    dx = -(dl[..., None] * w).sum(-2)                                  # (B, H, N, d)
    dmeans = (dl[..., None] * w).sum(axis=(0, 2))                      # (H, K, d)
    dlog_var = 0.5 * (dl[..., None] * (diff * w - 1)).sum(axis=(0, 2)) # (H, K, d)
    if log_var.ndim == 2:
        dlog_var = dlog_var.sum(-1)                                    # (H, K)
    dlog_pi = dl.sum(axis=(0, 2))                                      # (H, K)
    dlogits = dlog_pi - np.exp(log_pi) * dlog_pi.sum(-1, keepdims=True)
    return dict(x=dx, means=dmeans, log_var=dlog_var, logits=dlogits, temperature=dtau)


def gma_backward(do, q, k, v, means, log_var, logits, *, causal=False, norm="row",
                 temperature=1.0, eps=1e-6, key_mask=None, tau_from_log_r=False):
    """Gradients of sum(o * do): dict "q", "k", "v", "means", "log_var", "logits", "temperature"."""
    o, (rq, rk, mask, S, z) = _forward(q, k, v, means, log_var, logits, causal, norm,
                                       temperature, eps, key_mask)
    eps = q.dtype.type(eps)
    # 2. the read-out: dS_t, dz_t of the memory each query read, and drq
    if norm == "row":
        # o_t = num_t / den_t, num_t = rq_t S_t, den_t = rq_t . z_t + eps
        den = (rq * z).sum(-1) + eps                                   # (B, H, N)
        dnum = do / den[..., None]                                     # (B, H, N, e)
        dden = -(do * o).sum(-1) / den                                 # (B, H, N)
        drq = np.einsum("bhne,bhnke->bhnk", dnum, S) + dden[..., None] * z
        dS = rq[..., None] * dnum[..., None, :]                        # (B, H, N, K, e)
        dz = rq * dden[..., None]                                      # (B, H, N, K)
    else:
        # o_t = sum_k rq_tk S_tk / (z_tk + eps)
        inv = 1 / (z + eps)                                            # (B, H, N, K)
        sdot = np.einsum("bhnke,bhne->bhnk", S, do)
        drq = sdot * inv
        dS = (rq * inv)[..., None] * do[..., None, :]
        dz = -rq * sdot * inv * inv
    # 1. the memory write: token j reaches every S_t with t >= j (causal) or every t
    if causal:
        G = np.flip(np.cumsum(np.flip(dS, 2), axis=2), 2)              # suffix sums over t
        g = np.flip(np.cumsum(np.flip(dz, 2), axis=2), 2)
    else:
        G = np.broadcast_to(dS.sum(2, keepdims=True), dS.shape)
        g = np.broadcast_to(dz.sum(2, keepdims=True), dz.shape)
    dv = np.einsum("bhnk,bhnke->bhne", rk, G)                          # (B, H, N, e)
    drk = (np.einsum("bhnke,bhne->bhnk", G, v) + g) * mask[:, None, :, None]
    # 0. routing of queries and keys through the same mixture
    gq = _routing_backward(drq, q, means, log_var, logits, temperature, tau_from_log_r)
    gk = _routing_backward(drk, k, means, log_var, logits, temperature, tau_from_log_r)
    dtau = gq["temperature"] + gk["temperature"]
    return dict(q=gq["x"], k=gk["x"], v=dv,
                means=gq["means"] + gk["means"], log_var=gq["log_var"] + gk["log_var"],
                logits=gq["logits"] + gk["logits"],
                temperature=dtau if np.ndim(temperature) == 1 else float(dtau.sum()))
