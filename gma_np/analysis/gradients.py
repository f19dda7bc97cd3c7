"""Gradient structure: how the responsibilities modulate the gradients that reach q and k.

Dimension legend: B batch, H heads, N tokens, d head size, e value size, K components.

q enters GMA only through R_Q = r(q), and k only through R_K = r(k). With dR_i the
gradient of the loss with respect to token i's responsibilities (from the read-out, the
dense reference's dense_mix_backward) and the routing Jacobian of gma_np.analysis.stability,

    dq_i = J(q_i)^T dR_i = (1/tau) G_i^T S_i dR_i,     S_i = diag(r_i) - r_i r_i^T

S_i is the covariance of a one-draw categorical with probabilities r_i; by Gershgorin,
||S_i||_2 <= max_k 2 r_ik (1 - r_ik) <= 2 (1 - max_k r_ik) <= 2 H(r_i) (nats), so

    ||dq_i|| <= (2/tau) (1 - max_k r_ik) ||G_i||_2 ||dR_i||_2

The gradient to a query (or key) is gated by how undecided its routing is: a token
routed with certainty to one component passes (almost) nothing to its projection, and
the gate opens with the responsibility entropy. Measured per token: ||dq_i||, H(r_i),
and the modulation m_i = ||S_i dR_i|| / ||dR_i||, which must lie below 2 (1 - max r_i)
(docs/analysis.md, "Gradient structure").

dq and dk are gma_np.gma_backward's (the engine's); the dR come from the dense
reference, and tests/test_analysis.py checks that J^T dR reproduces dq.
"""

import numpy as np
from scipy.stats import spearmanr

from gma_np import gma_backward, gma_forward, responsibilities
from gma_np.memory.reference import dense_mix_backward

# Entropy bins of the binned medians: quantile bins, so each holds the same number of tokens.
ENTROPY_BINS = 10


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _per_head(a):
    """(B, H, N, c) -> (H, B*N, c)."""
    B, H, N, c = a.shape
    return a.transpose(1, 0, 2, 3).reshape(H, B * N, c)


def token_gradients(q, k, v, do, means, log_var, logits, temperature, *, causal=True,
                    norm="row", eps=1e-6, key_mask=None):
    """Per head, per real token (H, T) arrays, as a dict: grad_q, grad_k (the norms of
    the engine's dq, dk), entropy_q, entropy_k, modulation_q, modulation_k, rmax_q,
    rmax_k, and the full dq, dk (B, H, N, d) and drq, drk (B, H, N, K).

    q, k (B, H, N, d), v, do (B, H, N, e): one layer's inputs to GMA and the gradient of
    the loss with respect to its output; means (H, K, d), ...: its mixture. key_mask
    (B, N) bool or None: the padding keys write nothing (as in the layer, so their dR_K
    and dk are 0), and the per-token arrays hold the real tokens only, T of them in
    row-major order (T = B N without a mask)."""
    q, k, v, do = (_f64(a) for a in (q, k, v, do))
    B, H, N, _ = q.shape
    real = np.ones((B, N), dtype=bool) if key_mask is None else np.asarray(key_mask, dtype=bool)
    _, cache = gma_forward(q, k, v, means, log_var, logits, causal=causal, norm=norm,
                           temperature=temperature, eps=eps, key_mask=key_mask)
    g = gma_backward(do, cache)
    rq = responsibilities(q, means, log_var, logits, temperature)   # (B, H, N, K)
    rk = responsibilities(k, means, log_var, logits, temperature)
    drq, drk = np.empty_like(rq), np.empty_like(rk)
    for b in range(B):
        m = real[b][:, None]                                       # (N, 1)
        for h in range(H):
            drq[b, h], drk[b, h], _ = dense_mix_backward(do[b, h], rq[b, h], rk[b, h] * m,
                                                         v[b, h], causal, norm == "slot", eps)
            drk[b, h] *= m                                          # R~_K = key_mask * R_K
    out = {"dq": g["q"], "dk": g["k"], "drq": drq, "drk": drk}
    flat_real = real.reshape(-1)
    for name, r, dr, dx in (("q", rq, drq, g["q"]), ("k", rk, drk, g["k"])):
        r, dr, dx = (_per_head(a)[:, flat_real] for a in (r, dr, dx))   # (H, T, .)
        s_dr = r * (dr - (r * dr).sum(-1, keepdims=True))          # S_i dR_i
        norm_dr = np.linalg.norm(dr, axis=-1)
        out[f"grad_{name}"] = np.linalg.norm(dx, axis=-1)
        out[f"entropy_{name}"] = -(r * np.log(np.where(r > 0, r, 1.0))).sum(-1)
        out[f"modulation_{name}"] = np.divide(np.linalg.norm(s_dr, axis=-1), norm_dr,
                                              out=np.zeros_like(norm_dr), where=norm_dr > 0)
        out[f"rmax_{name}"] = r.max(-1)
    return out


def binned_medians(entropy, values, n_bins=ENTROPY_BINS):
    """(bin centres, medians) of `values` in quantile bins of `entropy` (both (T,))."""
    entropy, values = _f64(entropy), _f64(values)
    edges = np.unique(np.quantile(entropy, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges, entropy, side="right") - 1, 0, max(edges.size - 2, 0))
    centres, medians = [], []
    for i in range(max(edges.size - 1, 1)):
        sel = which == i
        if sel.any():
            centres.append(float(np.median(entropy[sel])))
            medians.append(float(np.median(values[sel])))
    return np.array(centres), np.array(medians)


def gradient_summary(tg, h, name):
    """The numbers of one head and stream ("q" or "k") of token_gradients' dict:
    spearman (rank correlation of gradient norm with entropy), the median gradient norm
    of the lowest and highest entropy bins, and gate_ok (the share of tokens whose
    modulation is within 2 (1 - max r), which the derivation says is all of them)."""
    ent, grad = tg[f"entropy_{name}"][h], tg[f"grad_{name}"][h]
    centres, medians = binned_medians(ent, grad)
    rho = spearmanr(ent, grad)[0] if np.ptp(ent) > 0 and np.ptp(grad) > 0 else np.nan
    gate = 2.0 * (1.0 - tg[f"rmax_{name}"][h])
    ok = tg[f"modulation_{name}"][h] <= gate * (1 + 1e-9) + 1e-12     # rounding allowance
    return {"spearman": float(rho), "low_entropy_median": float(medians[0]),
            "high_entropy_median": float(medians[-1]), "gate_ok": float(ok.mean())}
