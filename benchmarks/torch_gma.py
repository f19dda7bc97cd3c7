"""The straightforward PyTorch CPU implementation of GMA that bench_gma.py races against.

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K components, C chunk length.

This is the baseline of the speed figures in docs/performance.md, written the
way a PyTorch user would first write it, and NOT part of gma_np (PyTorch is
never a dependency; bench_gma.py imports this module only in the subprocess
that times PyTorch, when torch is installed):

- responsibilities by the matmul expansion of the quadratic term,
      sum_j (x_j - mu_kj)^2 / s2_kj = (x^2) @ (1/s2)^T - 2 x @ (mu/s2)^T + sum_j mu^2/s2,
  then log_softmax over K;
- bidirectional mixing by two matmuls through the K-slot memory;
- causal mixing chunked: per chunk of C tokens the masked C x C block
  rq_c rk_c^T handles the tokens of the chunk, and the memory summed over the
  previous chunks (an exclusive cumsum of rk_c^T v_c) handles the rest;
- the backward is autograd.

It computes what gma_np.gma computes (bench_gma.py checks the two agree
before timing them).
"""

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def responsibilities(x, means, log_var, logits, tau):
    """r (B, H, N, K) = softmax_k(l_k(x) / tau) by the matmul expansion; x (B, H, N, d)."""
    d = means.shape[-1]
    if log_var.dim() == 2:                                          # spherical (H, K)
        log_var = log_var[:, :, None].expand(-1, -1, d)
    inv_var = torch.exp(-log_var)                                   # (H, K, d)
    quad = ((x * x) @ inv_var.transpose(-1, -2)                     # (B, H, N, K)
            - 2.0 * x @ (means * inv_var).transpose(-1, -2)
            + (means * means * inv_var).sum(-1)[:, None, :])
    log_pi = torch.log_softmax(logits, dim=-1)                      # (H, K)
    l = log_pi[:, None, :] - 0.5 * (quad + log_var.sum(-1)[:, None, :] + d * LOG_2PI)
    return torch.softmax(l / tau, dim=-1)


def _mix_bidirectional(rq, rk, v, slot, eps):
    S = rk.transpose(-1, -2) @ v                                    # (B, H, K, e)
    z = rk.sum(-2)                                                  # (B, H, K)
    if slot:
        return rq @ (S / (z[..., None] + eps))
    return (rq @ S) / ((rq * z[..., None, :]).sum(-1, keepdim=True) + eps)


def _mix_causal_chunked(rq, rk, v, slot, eps, chunk):
    B, H, N, K = rq.shape
    e = v.shape[-1]
    pad = (-N) % chunk
    if pad:
        rq = torch.nn.functional.pad(rq, (0, 0, 0, pad))
        rk = torch.nn.functional.pad(rk, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    nc = (N + pad) // chunk
    rq = rq.reshape(B, H, nc, chunk, K)
    rk = rk.reshape(B, H, nc, chunk, K)
    v = v.reshape(B, H, nc, chunk, e)
    U = rk.transpose(-1, -2) @ v                                    # (B, H, nc, K, e)
    S_prev = torch.cumsum(U, dim=2) - U                             # memory before each chunk
    zc = rk.sum(-2)                                                 # (B, H, nc, K)
    z_prev = torch.cumsum(zc, dim=2) - zc
    tril = torch.tril(torch.ones(chunk, chunk, dtype=rq.dtype))
    if slot:
        z_t = z_prev[..., None, :] + torch.cumsum(rk, dim=-2)       # (B, H, nc, C, K)
        u = rq / (z_t + eps)
        A = (u @ rk.transpose(-1, -2)) * tril                       # (B, H, nc, C, C)
        o = A @ v + u @ S_prev
    else:
        A = (rq @ rk.transpose(-1, -2)) * tril                      # (B, H, nc, C, C)
        num = A @ v + rq @ S_prev                                   # (B, H, nc, C, e)
        den = A.sum(-1, keepdim=True) + (rq * z_prev[..., None, :]).sum(-1, keepdim=True) + eps
        o = num / den
    return o.reshape(B, H, nc * chunk, e)[:, :, :N]


def gma(q, k, v, means, log_var, logits, *, causal=False, norm="row", temperature=1.0,
        eps=1e-6, chunk=64):
    """o (B, H, N, e): the same math as gma_np.gma (no key mask), differentiable by autograd."""
    rq = responsibilities(q, means, log_var, logits, temperature)
    rk = responsibilities(k, means, log_var, logits, temperature)
    if causal:
        return _mix_causal_chunked(rq, rk, v, norm == "slot", eps, chunk)
    return _mix_bidirectional(rq, rk, v, norm == "slot", eps)


def sdpa(q, k, v, causal):
    """Softmax attention, PyTorch's scaled_dot_product_attention: the quadratic yardstick."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
