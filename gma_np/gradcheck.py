"""Finite-difference gradient checking, as a tool (docs/gradcheck.md).

    report = gma_np.gradcheck(fun, grad, inputs)
    assert report.ok, report

`fun(**inputs)` returns an array `out`; `grad(dout, **inputs)` returns a dict of
the gradients of the scalar f = sum(out * dout) keyed like `inputs`. Every
input that `grad` returns a gradient for (or that `wrt` names) is checked.

What is a value and what is not: float arrays and scalars are values, and so
are integer scalars (temperature=1 means 1.0): all are cast to float64 and
perturbed. Integer arrays (token ids, indices), bools (flags, masks) and
anything else are passed through untouched; naming one in `wrt`, or `grad`
returning a gradient for one, is a ValueError that says why.

The numeric derivative is the 5-point central difference in float64,

    f'(x) ~ [f(x - 2h) - 8 f(x - h) + 8 f(x + h) - f(x + 2h)] / (12 h),

whose truncation error is O(h^4) and rounding error about eps_64 |f| / h: with
h = 1e-3 * max(1, |x|) both are near 1e-12 relative, far below the 1e-6 the
gradients are held to, so a wrong element stands out. An element passes when

    |analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)

with atol = GRADCHECK_NOISE_FACTOR * eps_64 * sum|out * dout| / h: the
rounding noise of the stencil, below which no difference means anything.
Equivalently, the reported relative error

    rel_error = |analytic - numeric| / max(|analytic|, |numeric|, atol / rtol)

must be <= rtol: elements smaller than the noise floor atol / rtol are
measured against the floor instead of against themselves.

Modes: "full" perturbs every element (cost 4 evaluations per element);
"random" compares <grad, t> with the derivative along random unit directions t,
one input at a time (cost 4 per direction); "auto" picks "full" up to
GRADCHECK_MAX_FULL_ELEMENTS elements in all. The random mode sees a wrong
element only in proportion to its share of the dot product: use "full" to
hunt a single bad element.
"""

from dataclasses import dataclass, field

import numpy as np

from gma_np._numerics import (
    FD_STEP,
    GRADCHECK_MAX_FULL_ELEMENTS,
    GRADCHECK_NOISE_FACTOR,
    GRADCHECK_RTOL,
)

_EPS64 = np.finfo(np.float64).eps
# 5-point central stencil: offsets (in units of h) and weights (times 1 / (12 h))
_STENCIL = ((-2.0, 1.0), (-1.0, -8.0), (1.0, 8.0), (2.0, -1.0))


@dataclass
class InputCheck:
    """The verdict on one input: its worst element (or direction)."""
    name: str
    checked: int          # elements (full) or directions (random) checked
    worst_index: tuple    # index of the worst element; (direction number,) in random mode
    analytic: float
    numeric: float
    rel_error: float      # |analytic - numeric| / max(|analytic|, |numeric|, atol / rtol)
    ok: bool              # rel_error <= rtol


@dataclass
class GradcheckReport:
    """What gradcheck found: `.ok` is True when every checked input passed."""
    mode: str
    rtol: float
    evaluations: int
    inputs: list = field(default_factory=list)   # InputCheck per input

    @property
    def ok(self):
        return all(c.ok for c in self.inputs)

    def __getitem__(self, name):
        for c in self.inputs:
            if c.name == name:
                return c
        raise KeyError(name)

    def __str__(self):
        head = f"gradcheck ({self.mode}, rtol {self.rtol:g}, {self.evaluations} evaluations): " \
               f"{'ok' if self.ok else 'FAILED'}"
        # columns as wide as their longest entry, so that long names keep the table aligned
        wn = max([len("input")] + [len(c.name) for c in self.inputs])
        wi = max([len("worst at")] + [len(str(c.worst_index)) for c in self.inputs])
        rows = [f"  {'input':<{wn}} {'checked':>7}  {'worst at':<{wi}} {'analytic':>14} "
                f"{'numeric':>14} {'rel err':>9}  verdict"]
        for c in self.inputs:
            rows.append(f"  {c.name:<{wn}} {c.checked:>7}  {str(c.worst_index):<{wi}} "
                        f"{c.analytic:>14.6e} {c.numeric:>14.6e} {c.rel_error:>9.2e}  "
                        f"{'ok' if c.ok else 'FAIL'}")
        return "\n".join([head] + rows)


def _is_value(value):
    """A float array or scalar, or an integer scalar: an input gradcheck perturbs."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f"
    return isinstance(value, (float, np.floating, int, np.integer))


def _as_float64(value):
    """A float64 copy of a value (scalars become python floats)."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    return float(value)


def _why_not_a_value(name, value):
    """Why gradcheck leaves `value` alone, for an error message about `name`."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, np.ndarray) and value.dtype.kind == "b"):
        return f"{name!r} is boolean (a flag or a mask): it has no derivative"
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return (f"{name!r} is an integer array (dtype {value.dtype}): gradcheck takes integer "
                f"arrays for indices and never perturbs them; pass it as a float array to check it")
    if isinstance(value, np.ndarray):
        return f"{name!r} is an array of dtype {value.dtype}, not a float array"
    return f"{name!r} is a {type(value).__name__}, not a number or a float array"


def _verdict(name, checked, index, analytic, numeric, atol, rtol):
    """The worst element of one input: relative error against max(|a|, |n|, noise floor)."""
    diff = np.abs(analytic - numeric)
    scale = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), atol / rtol)
    rel = diff / scale
    worst = int(np.argmax(rel))
    return InputCheck(name=name, checked=checked, worst_index=index(worst),
                      analytic=float(analytic[worst]), numeric=float(numeric[worst]),
                      rel_error=float(rel[worst]), ok=bool(rel[worst] <= rtol))


def gradcheck(fun, grad, inputs, *, dout=None, wrt=None, mode="auto", step=FD_STEP,
              rtol=GRADCHECK_RTOL, n_directions=3, seed=0):
    """Check `grad` against central finite differences of `fun`, in float64.

    Parameters
    ----------
    fun : callable, fun(**inputs) -> array `out`
    grad : callable, grad(dout, **inputs) -> dict of gradients of sum(out * dout)
    inputs : dict of name -> array or number; float arrays and float or integer
        scalars are cast to float64 and checked, others (integer arrays, masks,
        flags) are passed through untouched
    dout : cotangent of `out`; default a seeded standard normal array
    wrt : names to check; default every value in `inputs` that `grad` returns a gradient for
    mode : "full", "random" or "auto"
    step : relative finite-difference step h (h = step * max(1, |x|))
    rtol : relative tolerance
    n_directions : directions per input in random mode
    seed : seeds dout and the random directions

    Returns
    -------
    GradcheckReport, with .ok and a printable table naming, per input, the worst
    element with its analytic value, numeric value and relative error.
    """
    if mode not in ("full", "random", "auto"):
        raise ValueError(f"mode: expected 'full', 'random' or 'auto', got {mode!r}")
    if not isinstance(inputs, dict):
        raise TypeError(f"inputs: expected a dict of name -> array, got {type(inputs).__name__}")
    rng = np.random.default_rng(seed)
    base = {n: _as_float64(v) if _is_value(v) else v for n, v in inputs.items()}
    out = np.asarray(fun(**base), dtype=np.float64)
    if dout is None:
        dout = rng.standard_normal(out.shape)
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != out.shape:
        raise ValueError(f"dout: expected the shape of fun's output {out.shape}, got {dout.shape}")
    analytic = grad(dout, **base)
    if not isinstance(analytic, dict):
        raise TypeError(f"grad: expected it to return a dict of name -> gradient, "
                        f"got {type(analytic).__name__}")
    for n in analytic:
        if n in base and analytic[n] is not None and not _is_value(base[n]):
            raise ValueError(f"grad: returned a gradient for {n!r}, but {_why_not_a_value(n, base[n])}"
                             f" (leave it out of grad's dict)")
    if wrt is None:
        wrt = [n for n in base if _is_value(base[n]) and n in analytic]
    for n in wrt:
        if n not in base:
            raise ValueError(f"wrt: {n!r} is not a name of `inputs` (they are {sorted(base)})")
        if not _is_value(base[n]):
            raise ValueError(f"wrt: {_why_not_a_value(n, base[n])}")
        if n not in analytic:
            raise ValueError(f"grad: returned no gradient for {n!r} (it returned {sorted(analytic)})")
        if np.shape(analytic[n]) != np.shape(base[n]):
            raise ValueError(f"grad: gradient of {n!r} has shape {np.shape(analytic[n])}, "
                             f"expected the input's shape {np.shape(base[n])}")
    if mode == "auto":
        total = sum(np.size(base[n]) for n in wrt)
        mode = "full" if total <= GRADCHECK_MAX_FULL_ELEMENTS else "random"

    evaluations = [1]
    # rounding error of one evaluation of f = sum(out * dout), times the safety factor
    f_noise = GRADCHECK_NOISE_FACTOR * _EPS64 * float(np.abs(out * dout).sum())

    def f_at(name, value):
        evaluations[0] += 1
        args = dict(base)
        args[name] = value
        return float((np.asarray(fun(**args), dtype=np.float64) * dout).sum())

    def derivative(name, x, direction, h):
        """5-point central difference of f along `direction` (same shape as x)."""
        total = 0.0
        for offset, weight in _STENCIL:
            moved = x + offset * h * direction
            total += weight * f_at(name, moved if isinstance(x, np.ndarray) else float(moved))
        return total / (12.0 * h)

    report = GradcheckReport(mode=mode, rtol=rtol, evaluations=0)
    for name in wrt:
        x = base[name]
        g = np.asarray(analytic[name], dtype=np.float64)
        if mode == "full":
            flat = np.ravel(x)
            numeric = np.empty(flat.size)
            hs = step * np.maximum(1.0, np.abs(flat))
            for i in range(flat.size):
                e_i = np.zeros(flat.size)
                e_i[i] = 1.0
                direction = e_i.reshape(np.shape(x)) if isinstance(x, np.ndarray) else 1.0
                numeric[i] = derivative(name, x, direction, hs[i])
            shape = np.shape(x)
            check = _verdict(name, flat.size, lambda i: tuple(int(j) for j in np.unravel_index(i, shape)),
                             g.ravel(), numeric, f_noise / hs, rtol)
        else:
            an, nu, atol = [], [], []
            h = step * max(1.0, float(np.sqrt(np.mean(np.square(x)))))
            for _ in range(n_directions):
                t = rng.standard_normal(np.shape(x))
                t /= np.linalg.norm(t)
                nu.append(derivative(name, x, t if isinstance(x, np.ndarray) else float(t), h))
                an.append(float((g * t).sum()))
                # the dot product is judged against the size of its terms, not of its sum
                atol.append(max(f_noise / h, rtol * float(np.abs(g * t).sum())))
            check = _verdict(name, n_directions, lambda i: (i,), np.array(an), np.array(nu),
                             np.array(atol), rtol)
        report.inputs.append(check)
    report.evaluations = evaluations[0]
    return report
