"""The self-check behind `gma-np check`: every configuration of GMA, gradient-checked.

For each point of {bidirectional, causal} x {row, slot} x {diag, spherical} x
{key mask, none} x {scalar, per-head temperature} it runs, in float64 on a
small random problem with odd sizes:

- gma_np.gradcheck over every element of every differentiable input
  (q, k, v, means, log_var, logits, temperature) against 5-point central differences;
- the fast path against the dense N x N reference (forward and every gradient),
  and, when causal, against the loop-over-t recurrence.
"""

from dataclasses import dataclass

import numpy as np

from gma_np._numerics import GRADCHECK_RTOL, RTOL_EXACT
from gma_np.gradcheck import gradcheck
from gma_np.mixers.gma.mixing import gma, gma_backward, gma_forward
from gma_np.mixers.gma.reference.dense import gma_dense, gma_dense_backward
from gma_np.mixers.gma.reference.recurrent import gma_loop
from gma_np.mixers.gma.configurations import Configuration, configurations

# Small odd sizes: every element is finite-differenced, 32 configurations in seconds.
CHECK_SIZES = dict(B=2, H=2, N=7, d=3, e=2, K=3)


@dataclass
class CheckRow:
    config: str
    gradcheck_ok: bool
    worst_input: str
    worst_rel_error: float      # relative error of the worst gradient element vs central differences
    reference_rel_error: float  # max relative difference to the dense (and loop) reference
    ok: bool


def make_problem(rng, B, H, N, d, e, K, covariance="diag", per_head=False, masked=False):
    """A random, well-conditioned GMA problem: (differentiable inputs, key_mask)."""
    inputs = dict(
        q=rng.standard_normal((B, H, N, d)),
        k=rng.standard_normal((B, H, N, d)),
        v=rng.standard_normal((B, H, N, e)),
        means=rng.standard_normal((H, K, d)),
        log_var=0.3 * rng.standard_normal((H, K, d) if covariance == "diag" else (H, K)),
        logits=0.5 * rng.standard_normal((H, K)),
        temperature=rng.uniform(0.5, 1.5, H) if per_head else 0.8,
    )
    mask = None
    if masked:
        mask = rng.random((B, N)) > 0.3
        mask[:, 0] = True   # at least one real key per sequence
    return inputs, mask


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def check_configuration(causal, norm, covariance, masked, per_head, seed=0, sizes=CHECK_SIZES):
    rng = np.random.default_rng(seed)
    inputs, mask = make_problem(rng, covariance=covariance, per_head=per_head, masked=masked, **sizes)
    options = dict(causal=causal, norm=norm, key_mask=mask)

    def fun(**a):
        return gma(**a, **options)

    def grad(dout, **a):
        return gma_backward(dout, gma_forward(**a, **options)[1])

    report = gradcheck(fun, grad, inputs, mode="full", seed=seed)
    worst = max(report.inputs, key=lambda c: c.rel_error)
    # fast path against the dense reference, forward and backward
    o = fun(**inputs)
    dout = rng.standard_normal(o.shape)
    ref_err = _rel(o, gma_dense(**inputs, **options))
    fast, dense = grad(dout, **inputs), gma_dense_backward(dout, **inputs, **options)
    ref_err = max([ref_err] + [_rel(fast[n], dense[n]) for n in dense])
    if causal:
        ref_err = max(ref_err, _rel(o, gma_loop(**inputs, norm=norm, key_mask=mask)))
    name = Configuration(causal, norm, covariance, masked, per_head).name
    ref_ok = ref_err <= RTOL_EXACT[np.dtype(np.float64)] * 100
    return CheckRow(name, report.ok, worst.name, worst.rel_error, ref_err, report.ok and ref_ok)


def check_matrix(seed=0):
    """CheckRow for every configuration of the matrix."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    return [check_configuration(*point, seed=seed) for point in configurations()]


def format_rows(rows):
    lines = [f"{'configuration':<36} {'gradcheck':>9} {'worst input':>12} "
             f"{'rel err':>9} {'vs dense':>9}  verdict",
             "-" * 88]
    for r in rows:
        lines.append(f"{r.config:<36} {'ok' if r.gradcheck_ok else 'FAIL':>9} {r.worst_input:>12} "
                     f"{r.worst_rel_error:>9.1e} {r.reference_rel_error:>9.1e}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    failed = sum(not r.ok for r in rows)
    lines.append("-" * 88)
    lines.append(f"{len(rows) - failed} passed, {failed} failed "
                 f"(gradients to rtol {GRADCHECK_RTOL:g} against 5-point central differences, float64)")
    return "\n".join(lines)
