"""A port of GMA to PyTorch, checked against the golden vectors: the worked example of
docs/port-guide.md. Gradients come from torch.autograd, so the backward is the
one any PyTorch model would use.

Needs torch (tests/test_testing.py skips when it is missing). It imports
nothing from gma_np. The port form: NumPy arrays in, NumPy arrays out.
"""

import math

import numpy as np
import torch

LOG_2PI = math.log(2.0 * math.pi)


def _responsibilities(x, means, log_var, logits, tau):
    """r (B, H, N, K) = softmax_k(l_k(x) / tau) for x (B, H, N, d)."""
    d = means.shape[-1]
    lv = log_var if log_var.dim() == 3 else log_var[:, :, None].expand(-1, -1, d)   # (H, K, d)
    diff = x[..., :, None, :] - means[:, None, :, :]                               # (B, H, N, K, d)
    quad = (diff * diff * torch.exp(-lv)[:, None]).sum(-1)                         # (B, H, N, K)
    log_pi = torch.log_softmax(logits, dim=-1)                                     # (H, K)
    l = log_pi[:, None, :] - 0.5 * (quad + lv.sum(-1)[:, None, :] + d * LOG_2PI)
    return torch.softmax(l / tau.reshape(-1, 1, 1), dim=-1)


def _gma(q, k, v, means, log_var, logits, tau, causal, norm, eps, mask):
    rq = _responsibilities(q, means, log_var, logits, tau)                         # (B, H, N, K)
    rk = _responsibilities(k, means, log_var, logits, tau) * mask[:, None, :, None]
    if causal:
        S = torch.cumsum(rk[..., None] * v[..., None, :], dim=2)                  # (B, H, N, K, e)
        z = torch.cumsum(rk, dim=2)                                                # (B, H, N, K)
    else:
        S = torch.einsum("bhnk,bhne->bhke", rk, v)[:, :, None]                    # (B, H, 1, K, e)
        z = rk.sum(2, keepdim=True)                                                # (B, H, 1, K)
    if norm == "row":
        num = (rq[..., None] * S).sum(-2)                                          # (B, H, N, e)
        return num / ((rq * z).sum(-1, keepdim=True) + eps)
    return ((rq / (z + eps))[..., None] * S).sum(-2)


def _tensors(q, k, v, means, log_var, logits, temperature, key_mask, requires_grad):
    dtype = torch.float64 if q.dtype == np.float64 else torch.float32
    t = {name: torch.tensor(x, dtype=dtype, requires_grad=requires_grad)
         for name, x in dict(q=q, k=k, v=v, means=means, log_var=log_var, logits=logits).items()}
    t["temperature"] = torch.tensor(np.broadcast_to(temperature, (means.shape[0],)), dtype=dtype,
                                    requires_grad=requires_grad)
    B, _, N, _ = q.shape
    t["mask"] = (torch.ones(B, N, dtype=dtype) if key_mask is None
                 else torch.tensor(np.asarray(key_mask), dtype=dtype))
    return t


def gma(q, k, v, means, log_var, logits, *, causal=False, norm="row", temperature=1.0,
        eps=1e-6, key_mask=None):
    """The port form of the forward: NumPy in, o (B, H, N, e) NumPy out."""
    t = _tensors(q, k, v, means, log_var, logits, temperature, key_mask, False)
    o = _gma(t["q"], t["k"], t["v"], t["means"], t["log_var"], t["logits"], t["temperature"],
             causal, norm, eps, t["mask"])
    return o.numpy()


def gma_backward(do, q, k, v, means, log_var, logits, *, causal=False, norm="row",
                 temperature=1.0, eps=1e-6, key_mask=None):
    """The port form of the backward: gradients of sum(o * do) by torch.autograd."""
    t = _tensors(q, k, v, means, log_var, logits, temperature, key_mask, True)
    o = _gma(t["q"], t["k"], t["v"], t["means"], t["log_var"], t["logits"], t["temperature"],
             causal, norm, eps, t["mask"])
    o.backward(torch.tensor(do, dtype=o.dtype))
    grads = {name: t[name].grad.numpy() for name in ("q", "k", "v", "means", "log_var", "logits")}
    dtau = t["temperature"].grad.numpy()
    grads["temperature"] = dtau if np.ndim(temperature) == 1 else float(dtau.sum())
    return grads


def responsibilities(x, means, log_var, logits, temperature=1.0):
    """The port form of the routing: r (..., H, N, K) as NumPy."""
    t = _tensors(x, x, x[..., :1], means, log_var, logits, temperature, None, False)
    return _responsibilities(t["q"], t["means"], t["log_var"], t["logits"], t["temperature"]).numpy()
