"""Input validation for the public API.

Every public function checks its arguments here before any kernel sees them,
so that bad input gets an error naming the argument, what was expected and
what came, never a Numba typing traceback and never a silent wrong answer.

Which exception (docs/numerics.md, section 8):

- TypeError: the wrong kind of object (an integer array, a dict for a cache).
- ValueError: a value invalid on its face, whatever the arithmetic: a wrong
  shape, NaN or inf, a temperature <= 0, eps < 0.
- FloatingPointError: a valid value that float64 cannot carry through the
  computation: exp(-log_var) or a log-density that overflows, 1 / tau that
  overflows, eps = 0 on an empty memory. Raised where the non-finite
  intermediate arises, naming the argument it comes from and the cause.
"""

import numbers

import numpy as np
from numba import njit

from gma_np._numerics import SUPPORTED_DTYPES

NORMS = ("row", "slot")


def _describe(x):
    """Short description of what came: type, and dtype/shape for arrays."""
    if isinstance(x, np.ndarray):
        return f"array of dtype {x.dtype} and shape {x.shape}"
    return f"{type(x).__name__} {x!r}"[:120]


def float_array(name, x, ndim=None, min_ndim=None, finite=True):
    """Return x as a C-contiguous float32/float64 ndarray, or raise.

    Rejects integer, boolean, complex and object dtypes (TypeError), the wrong
    number of dimensions (ValueError) and, with finite, NaN or inf entries (ValueError).
    finite=False leaves that check to the caller, for an op that establishes it from
    its own results (gma_np.mixers.gma.mixing, "Finiteness"): check_finite must then
    run on x wherever that result is not finite.
    """
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple, numbers.Number)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{name}: expected a NumPy array, got {_describe(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float32 or float64, got {x.dtype} "
            f"(cast explicitly with .astype(np.float64) if that is what you mean)")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {x.shape}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected at least {min_ndim} dimensions, got shape {x.shape}")
    if finite:
        check_finite(name, x)
    return np.ascontiguousarray(x)


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _finite_flat(x):
    """True iff every entry of the 1-D float array x (at least one entry) is finite: the
    sum, in x's dtype, of x[i] - x[i], which is 0 for a finite entry and NaN for a NaN or
    an inf one (inf - inf), so that the sum is 0 exactly when all are finite. "reassoc"
    lets the sum run in vector lanes; without "nnan" and "ninf" the compiler may not fold
    x - x to 0."""
    acc = x[0] - x[0]
    for i in range(1, x.shape[0]):
        acc += x[i] - x[i]
    return acc == 0


def all_finite(x):
    """True iff every entry of the float array x is finite.

    One pass and no temporary, where np.isfinite(x).all() writes a boolean array of x's
    size, whose fresh pages a process pays for as page faults on every call once glibc
    has given freed memory back (gma_backward at B=1 H=4 N=8192 d=K=e=64 float32: ~500
    faults for each check of a (4, 8192, 64) array; docs/performance.md, section 1, "The
    allocator"). A contiguous float32 or float64 array goes through _finite_flat (8 MiB
    of float32: 0.11 ms, against 0.45 for NumPy's pairwise sum); any other through the
    sum of x, which is finite only when every entry is (a NaN or an inf makes it NaN or
    inf; a sum that overflows with finite entries falls through to the entry-by-entry
    test)."""
    x = np.asarray(x)
    if x.size == 0:
        return True
    if x.dtype in SUPPORTED_DTYPES and (x.flags.c_contiguous or x.flags.f_contiguous):
        return bool(_finite_flat(x.ravel(order="K")))            # a view: no copy
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(x, axis=None)):
            return True
    return bool(np.isfinite(x).all())


def first_nonfinite(x):
    """The index (a tuple) of the first NaN or inf entry of x, or None."""
    if all_finite(x):
        return None
    finite = np.isfinite(x)
    if finite.all():
        return None
    return tuple(int(i) for i in np.unravel_index(np.argmin(finite), np.shape(x)))


def cache(name, value, expected_type, made_by):
    """Raise TypeError unless value is an instance of expected_type (what made_by returns)."""
    if not isinstance(value, expected_type):
        raise TypeError(
            f"{name}: expected the {expected_type.__name__} that {made_by} returns, "
            f"got {'None' if value is None else type(value).__name__}")


def check_finite(name, x):
    """Raise ValueError naming the first NaN or inf entry of x."""
    if not all_finite(x):
        bad = np.argwhere(~np.isfinite(x))[0]
        where = tuple(int(i) for i in bad)
        raise ValueError(
            f"{name}: expected finite values, got {x[where] if where else x} "
            f"at index {where} ({int((~np.isfinite(x)).sum())} non-finite entries)")


def check_shape(name, x, expected, what):
    """Raise ValueError if x.shape != expected; `what` explains the expectation."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({what}), got {x.shape}")


def mixture(means, log_var, logits, dtype=None):
    """Validate the mixture parameters of H heads and K components in R^d.

    Returns (means, log_var, logits, covariance) with covariance "diag" when
    log_var is (H, K, d) and "spherical" when it is (H, K). With dtype given,
    the arrays are cast to it (the computation dtype of the caller's q, k, v).
    """
    means = float_array("means", means, ndim=3)
    H, K, d = means.shape
    if K < 1 or d < 1 or H < 1:
        raise ValueError(f"means: expected shape (H, K, d) with H, K, d >= 1, got {means.shape}")
    log_var = float_array("log_var", log_var)
    if log_var.shape == (H, K, d):
        covariance = "diag"
    elif log_var.shape == (H, K):
        covariance = "spherical"
    else:
        raise ValueError(
            f"log_var: expected shape (H, K, d) = {(H, K, d)} for diagonal or (H, K) = "
            f"{(H, K)} for spherical covariance (from means {means.shape}), got {log_var.shape}")
    logits = float_array("logits", logits)
    check_shape("logits", logits, (H, K), f"(H, K) from means {means.shape}")
    if dtype is not None:
        means, log_var, logits = (a.astype(dtype, copy=False) for a in (means, log_var, logits))
    return means, log_var, logits, covariance


def temperature(tau, H):
    """Validate a temperature: a positive scalar or one positive value per head.

    Returns (tau_per_head, per_head): tau_per_head is a float64 array (H,), and
    per_head says whether the caller passed an (H,) array (so that the gradient
    comes back in the shape that was passed in).
    """
    if isinstance(tau, bool) or isinstance(tau, np.bool_):
        raise TypeError(f"temperature: expected a positive float or an array of shape ({H},), got {_describe(tau)}")
    if isinstance(tau, numbers.Real):
        arr, per_head = np.full(H, float(tau)), False
    elif isinstance(tau, np.ndarray):
        if tau.dtype not in SUPPORTED_DTYPES:
            # an integer array would get its gradient rounded to integers: reject it like q, k, v
            raise TypeError(
                f"temperature: expected a float32 or float64 array, got dtype {tau.dtype}")
        if tau.ndim == 0:
            arr, per_head = np.full(H, float(tau)), False
        elif tau.shape == (H,):
            arr, per_head = tau.astype(np.float64), True
        else:
            raise ValueError(
                f"temperature: expected a scalar or shape ({H},) (one per head), got shape {tau.shape}")
    else:
        raise TypeError(
            f"temperature: expected a positive float or an array of shape ({H},), got {_describe(tau)}")
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(f"temperature: expected finite values > 0, got {tau!r}")
    with np.errstate(over="ignore", divide="ignore"):
        inverse = 1.0 / arr
    if not np.isfinite(inverse).all():
        raise FloatingPointError(
            f"temperature: 1 / tau overflows float64 for tau = {float(arr[~np.isfinite(inverse)][0])!r} "
            f"(the log-densities are divided by tau): expected tau >= {1.0 / np.finfo(np.float64).max:.3g}")
    return arr, per_head


def eps_value(eps):
    """Validate the read-out eps: a finite float >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a float >= 0, got {_describe(eps)}")
    eps = float(eps)
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    return eps


def norm_value(norm):
    """Validate the read-out normalisation name."""
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    return norm


def key_mask(mask, B, N):
    """Validate a key mask (B, N) of booleans (or 0/1 numbers); None means all ones.

    Returns a float64 array (B, N) of zeros and ones.
    """
    if mask is None:
        return np.ones((B, N))
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"key_mask: expected a boolean array of shape ({B}, {N}) or None, got {_describe(mask)}")
    if mask.shape != (B, N):
        raise ValueError(f"key_mask: expected shape (B, N) = ({B}, {N}), got {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.astype(np.float64)
    if mask.dtype.kind in "iuf":
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("key_mask: expected only 0/1 (or True/False) values, got others")
        return mask.astype(np.float64)
    raise TypeError(f"key_mask: expected a boolean array, got dtype {mask.dtype}")


def qkv(q, k, v, finite=True):
    """Validate q, k (B, H, N, d) and v (B, H, N, e): same dtype, matching dims, and with
    finite, no NaN or inf (finite=False: see float_array)."""
    q = float_array("q", q, ndim=4, finite=finite)
    k = float_array("k", k, ndim=4, finite=finite)
    v = float_array("v", v, ndim=4, finite=finite)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_shape("k", k, q.shape, "the shape of q (B, H, N, d)")
    B, H, N, d = q.shape
    if v.shape[:3] != (B, H, N):
        raise ValueError(
            f"v: expected shape (B, H, N, e) with (B, H, N) = {(B, H, N)} from q, got {v.shape}")
    if N < 1 or v.shape[3] < 1:
        raise ValueError(f"q, v: expected N >= 1 and e >= 1, got q {q.shape}, v {v.shape}")
    return q, k, v


def mixture_matches(x_name, x_heads, x_dim, means):
    """Check that x (..., H, N, d) and the mixture agree on H and d."""
    H, K, d = means.shape
    if x_heads != H:
        raise ValueError(
            f"{x_name}: has {x_heads} heads but means has {H} (means is (H, K, d) = {means.shape})")
    if x_dim != d:
        raise ValueError(
            f"{x_name}: has feature size d = {x_dim} but means has d = {d} "
            f"(means is (H, K, d) = {means.shape})")
