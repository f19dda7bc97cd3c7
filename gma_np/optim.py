"""Optimisation for the small-model trainer: AdamW, the learning-rate schedule, gradient clipping.

Parameters and gradients are flat dicts name -> array (gma_np.nn.model). The
update is in place, in each parameter's dtype, and deterministic: the same
parameters, gradients and state give the same bits.

AdamW (Loshchilov and Hutter 2019, the form of torch.optim.AdamW), at step t
(counted from 1) with learning rate lr_t and decay lambda:

    p <- p - lr_t lambda p                       decoupled weight decay (only where `decay[name]`)
    m <- beta1 m + (1 - beta1) g
    v <- beta2 v + (1 - beta2) g^2
    p <- p - lr_t (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

Schedule: linear warm-up from lr/warmup to lr over `warmup` steps, then cosine
decay to min_ratio * lr at step `total`:

    lr(s) = lr (s + 1) / warmup                                      s < warmup
    lr(s) = lr [min_ratio + (1 - min_ratio) (1 + cos(pi u)) / 2],    u = (s - warmup) / (total - warmup)

Clipping: when the global norm ||g|| = sqrt(sum over every parameter of sum g^2)
exceeds max_norm, every gradient is scaled by max_norm / ||g||.

The update of a parameter is one pass over its elements (gma_np.nn._kernels._adamw_update),
every operation that of the NumPy form `adamw_update_naive` in its order and dtype,
so the same bits; the sums of squares of the norm are one float64 pass per gradient.
From ADAMW_STREAM_MIN_ELEMENTS elements the parameters go to the two streams
(gma_np._threads.run_streams) as two runs of near-equal size: each parameter's update
is its own, so the bits are the same on one thread or two.
"""

import math

import numpy as np

from gma_np._threads import run_streams
from gma_np.nn import _kernels as K

# Parameters below this many elements in all are updated on one thread: handing two
# groups to the streams costs ~50-75 us (docs/performance.md, section 6), what the
# update of ~10^5 elements takes.
ADAMW_STREAM_MIN_ELEMENTS = 2 ** 17


def _halves(names, sizes):
    """names cut into two runs of near-equal total size (one run below
    ADAMW_STREAM_MIN_ELEMENTS): the groups of AdamW.step's two streams."""
    total = sum(sizes)
    if total < ADAMW_STREAM_MIN_ELEMENTS or len(names) < 2:
        return [names]
    acc = 0
    for i, size in enumerate(sizes):
        if acc + size / 2 >= total / 2:
            return [names[:max(i, 1)], names[max(i, 1):]]
        acc += size
    return [names[:-1], names[-1:]]


def lr_at(step, base_lr, warmup, total, min_ratio=0.1):
    """Learning rate of step `step` (0-based) of a run of `total` steps (see the module docstring)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    u = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * u)))


def global_norm(grads):
    """sqrt(sum of squares of every gradient), accumulated in float64 (each gradient's sum
    in vector lanes, the gradients in order)."""
    return math.sqrt(sum(K._sum_squares(np.ascontiguousarray(g).reshape(-1))
                         for g in grads.values()))


def global_norm_naive(grads):
    """The reference of global_norm: NumPy's float64 sums."""
    return math.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads.values()))


def adamw_update_naive(p, g, m, v, lr, t, beta1, beta2, eps, weight_decay, decay):
    """The reference of one AdamW update of p, m, v in place (step t >= 1), in NumPy passes."""
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    g = g.astype(p.dtype, copy=False)
    if decay and weight_decay > 0:
        p *= p.dtype.type(1.0 - lr * weight_decay)
    m *= p.dtype.type(beta1)
    m += p.dtype.type(1.0 - beta1) * g
    v *= p.dtype.type(beta2)
    v += p.dtype.type(1.0 - beta2) * (g * g)
    denom = np.sqrt(v / p.dtype.type(bc2))
    denom += p.dtype.type(eps)
    p -= p.dtype.type(lr / bc1) * m / denom


def clip_grad_norm(grads, max_norm):
    """Scale every gradient in place so the global norm is at most max_norm (no-op if max_norm <= 0).
    Returns the norm before clipping."""
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-12)        # 1e-12: no division by zero; irrelevant when norm > max_norm > 0
        for g in grads.values():
            g *= scale
    return norm


class AdamW:
    """AdamW over a dict of parameters. State: m, v (one array per parameter, in its dtype) and t."""

    def __init__(self, params, *, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, decay=None):
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        if eps <= 0:
            raise ValueError(f"eps: expected a positive number, got {eps!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: expected a number >= 0, got {weight_decay!r}")
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        # decay: name -> bool; default decay everything
        self.decay = {name: True for name in params} if decay is None else dict(decay)
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}
        self.t = 0

    def step(self, params, grads, lr):
        """One update of every parameter in place, with learning rate lr."""
        missing = set(params) - set(grads)
        if missing:
            raise ValueError(f"grads: no gradient for {sorted(missing)}")
        self.t += 1
        bc1 = 1.0 - self.beta1 ** self.t
        bc2 = 1.0 - self.beta2 ** self.t
        names = list(params)
        groups = _halves(names, [params[n].size for n in names])

        def update(s):                                      # one group of parameters
            for name in groups[s]:
                self._update(name, params[name], grads[name], lr, bc1, bc2)
        # each parameter's update is its own: the same bits on one thread or two
        run_streams(update, len(groups))

    def _update(self, name, p, grad, lr, bc1, bc2):
        m, v = self.m[name], self.v[name]
        if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
            # a strided view is updated in place too, by the NumPy form
            adamw_update_naive(p, grad, m, v, lr, self.t, self.beta1, self.beta2,
                               self.eps, self.weight_decay, self.decay[name])
            return
        one = p.dtype.type
        g = np.ascontiguousarray(grad, dtype=p.dtype)
        keep = one(1.0 - lr * self.weight_decay) if (self.decay[name] and self.weight_decay > 0) \
            else one(1.0)
        K._adamw_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), keep, one(self.beta1),
                        one(1.0 - self.beta1), one(self.beta2), one(1.0 - self.beta2),
                        one(bc2), one(self.eps), one(lr / bc1))

    def state_arrays(self):
        """The state as a flat dict of arrays (for a checkpoint): "m/<name>", "v/<name>", "t"."""
        out = {f"m/{n}": a for n, a in self.m.items()}
        out.update({f"v/{n}": a for n, a in self.v.items()})
        out["t"] = np.array(self.t, dtype=np.int64)
        return out

    def load_state_arrays(self, arrays):
        """Restore from state_arrays(); shapes and dtypes must match the parameters."""
        for table, prefix in ((self.m, "m/"), (self.v, "v/")):
            for name, current in table.items():
                key = prefix + name
                if key not in arrays:
                    raise ValueError(f"optimizer state: missing {key!r}")
                a = arrays[key]
                if a.shape != current.shape or a.dtype != current.dtype:
                    raise ValueError(f"optimizer state: {key!r} has shape {a.shape} dtype {a.dtype}, "
                                     f"expected {current.shape} {current.dtype}")
                table[name] = a.copy()
        self.t = int(arrays["t"])
