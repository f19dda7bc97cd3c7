"""The PyTorch twin of a gma_np language model: what benchmarks/train_speed.py races against.

Dimension legend: B batch, N tokens, D d_model, V vocabulary, H heads, d query/key head
size, e value head size, K mixture components, w convolution width.

NOT part of gma_np (nothing in gma_np imports torch; train_speed.py imports this module
only when torch is installed). It is the model of gma_np.nn.model written the way a
PyTorch user would write it, with autograd for the backward:

    x = wte[idx] + wpe[:N]                                           (B, N, D)
    per block:  x = x + Wo(core(q, k, v)),  q, k, v = W(conv(ln1(x)))  (pre-norm residual)
                x = x + W2 gelu_tanh(W1 ln2(x) + b1) + b2
    logits = lnf(x) wte^T (tied) or lnf(x) head                       (B, N, V)
    loss = mean cross-entropy

conv is F.conv1d with groups = D on the input padded by w - 1 zeros on the left (gma_np's
causal_conv: out[t] = sum_s c[s] x[t - s]); the cores are GMA (benchmarks/torch_gma.py:
routing by the matmul expansion, causal mixing over chunks, a per-head temperature
exp(log_tau)) and softmax attention (F.scaled_dot_product_attention, scale 1/sqrt(d)).

`TorchTwin(model)` copies every parameter of a gma_np LanguageModel (after its
data-dependent initialisation) and `TorchTwin.optimizer(train_cfg)` is torch.optim.AdamW
with the same betas, eps and weight decay on the same parameters (gma_np's decay flags),
`step(idx, targets, lr, max_norm)` one training step with the same global-norm clipping.
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gma  # noqa: E402

# The twin of each gma_np mixer it has: (q, k, v (B, H, N, .), the core's parameters, cfg) -> o.
TWIN_CORES = {}


def _gma_core(q, k, v, p, cfg):
    tau = torch.exp(p["log_tau"])[:, None, None] if "log_tau" in p else 1.0   # (H, 1, 1)
    return torch_gma.gma(q, k, v, p["means"], p["log_var"], p["logits"], causal=True,
                         norm=cfg.norm, temperature=tau, eps=1e-6)


def _softmax_core(q, k, v, p, cfg):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


TWIN_CORES["gma"] = _gma_core
TWIN_CORES["softmax"] = _softmax_core

# LayerNorm's eps and the tanh form of GELU, as in gma_np.nn.layers.
LAYERNORM_EPS = 1e-5


class TorchTwin:
    """The parameters of a gma_np LanguageModel as torch tensors, and its training step."""

    def __init__(self, model, dtype=torch.float32):
        cfg = model.cfg
        if cfg.mixer not in TWIN_CORES:
            raise ValueError(f"mixer: the twin has {sorted(TWIN_CORES)}, got {cfg.mixer!r}")
        if model.buffers:
            raise ValueError("buffers: the twin copies parameters only")
        self.cfg, self.dtype = cfg, dtype
        self.params = {name: torch.tensor(a, dtype=dtype, requires_grad=True)
                       for name, a in model.params.items()}
        self.decay = model.decay_flags()

    def optimizer(self, train_cfg):
        """torch.optim.AdamW over the same parameters, decayed as gma_np decays them."""
        decayed = [p for n, p in self.params.items() if self.decay[n]]
        plain = [p for n, p in self.params.items() if not self.decay[n]]
        self.opt = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": train_cfg.weight_decay},
             {"params": plain, "weight_decay": 0.0}],
            lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.adam_eps)
        return self.opt

    def _mixer(self, x, l):
        cfg, P = self.cfg, self.params
        b = f"h{l}.{cfg.mixer}."
        B, N, _ = x.shape
        H = cfg.n_heads

        def heads(t):                                              # (B, N, H*c) -> (B, H, N, c)
            return t.view(B, N, H, -1).transpose(1, 2)
        q = heads(x @ P[b + "Wq"] + P[b + "bq"])
        k = heads(x @ P[b + "Wk"] + P[b + "bk"])
        v = heads(x @ P[b + "Wv"] + P[b + "bv"])
        core = {n[len(b):]: t for n, t in P.items()
                if n.startswith(b) and n[len(b):] not in ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo")}
        o = TWIN_CORES[cfg.mixer](q, k, v, core, cfg)              # (B, H, N, e)
        o = o.transpose(1, 2).reshape(B, N, -1)                    # (B, N, H*e)
        return o @ P[b + "Wo"] + P[b + "bo"]

    def _conv(self, x, c):
        """out[t] = sum_s c[s] x[t - s], zeros before the sequence: x (B, N, D), c (w, D)."""
        w, D = c.shape
        weight = c.flip(0).t().unsqueeze(1)                        # (D, 1, w): tap s at w-1-s
        xt = F.pad(x.transpose(1, 2), (w - 1, 0))                  # (B, D, w-1+N)
        return F.conv1d(xt, weight, groups=D).transpose(1, 2)      # (B, N, D)

    def loss(self, idx, targets):
        """Mean cross-entropy in nats (a 0-d tensor) of idx, targets (B, N) int arrays."""
        cfg, P = self.cfg, self.params
        idx = torch.as_tensor(idx, dtype=torch.long)
        targets = torch.as_tensor(targets, dtype=torch.long)
        D = cfg.d_model
        x = P["wte"][idx] + P["wpe"][:idx.shape[1]]
        for l in range(cfg.n_layers):
            b = f"h{l}."
            h = F.layer_norm(x, (D,), P[b + "ln1.g"], P[b + "ln1.b"], LAYERNORM_EPS)
            if cfg.conv_width:
                h = self._conv(h, P[b + "conv.c"])
            x = x + self._mixer(h, l)
            h = F.layer_norm(x, (D,), P[b + "ln2.g"], P[b + "ln2.b"], LAYERNORM_EPS)
            h = F.gelu(h @ P[b + "mlp.W1"] + P[b + "mlp.b1"], approximate="tanh")
            x = x + h @ P[b + "mlp.W2"] + P[b + "mlp.b2"]
        h = F.layer_norm(x, (D,), P["lnf.g"], P["lnf.b"], LAYERNORM_EPS)
        W = P["wte"].t() if cfg.tie_embeddings else P["head"]
        logits = h @ W                                             # (B, N, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def step(self, idx, targets, lr, max_norm):
        """One training step (forward, backward, clip, AdamW at lr); returns the loss."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(idx, targets)
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), max_norm)
        self.opt.step()
        return float(loss.detach())


def has_twin(mixer):
    """Whether the twin has a core for this gma_np mixer."""
    return mixer in TWIN_CORES


