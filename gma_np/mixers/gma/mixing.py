"""GMA mixing through a K-slot memory: gma, gma_forward, gma_backward (definition, sections 2 and 5).

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K components; P = B*H sequences.

Forward, per sequence (R_Q = r(q), R~_K = key_mask * r(k)):

    write   S = R~_K^T V (K, e),  z = R~_K^T 1 (K,)      (prefix sums S_t, z_t if causal)
    read    row:  O_i = (R_Q[i] S) / (R_Q[i] . z + eps)
            slot: O_i = sum_k R_Q[i,k] S[k] / (z[k] + eps)

Backward (docs/derivations.md, sections 4 to 6 and 8), the same for both norms once the read
is summarised by, per query i, the gradient of its routing dR_Q[i] and the two
pieces of the gradient of the memory it read, dS_i = outer(c_i, dO_i), dz_i:

    row:  c_i = R_Q[i] / den_i,  dz_i = -R_Q[i] (dO_i . O_i) / den_i
          dR_Q[i] = S dO_i / den_i - z (dO_i . O_i) / den_i
    slot: c_i = R_Q[i] / (z + eps),  dz_i = -R_Q[i] (S dO_i) / (z + eps)^2
          dR_Q[i] = S dO_i / (z + eps)

and every key j receives the sum of the dS_i, dz_i of the queries that read it
(all i bidirectionally, i >= j causally): G_j, g_j, then

    dV[j] = R~_K[j] G_j,   dR~_K[j,k] = G_j[k] . V[j] + g_j[k],   dR_K = key_mask * dR~_K.

Three forms of the same math live in the package; this module is the fast one, the
routing of gma_np.mixers.gma.routing followed by the feature memory of gma_np.memory:
bidirectional by float64 GEMMs through the (K, e) memory, one block of tokens at a
time (write all, then read; never an N x N matrix nor a float64 copy of an (N, K)
array), causal through the Numba prefix scan of gma_np.memory.scan or the chunked
form of gma_np.memory.chunked (never an N x N nor an N x K x e array).
gma_np.mixers.gma.reference holds the dense N x N form and the loop over t.

Finiteness. The op does not read q, k, v and do once more only to find a NaN or inf
where the package's own loops carry such an entry into a result that is checked anyway
(four passes over memory, 2-4% of a causal call at N = 8192: docs/performance.md); the
check of that result names the input first, with the message and index
_validation.check_finite gives (the same ValueError as an up-front check):

    q, k   every form. A non-finite coordinate makes the point's |x'|^2 non-finite in
           routing's Numba pass (kernels._log_density_expanded), which then takes every
           log-density of the point in the direct form: NaN or -inf, so its row maximum
           NaN (routing.softmax_rows_forward); routing.check_log_densities_finite
           checks q, then k
    v      the token scan: v_t enters the output of query t through products with finite
           weights in Numba's loops (0 * inf and 0 * NaN are NaN too, a masked key's
           included); check_output_finite checks v
    do     the token scan: do_t enters the suffix sums G of every key s <= t, and dv_s
           through them; check_gradients_finite checks do

The other forms (bidirectional, chunked) carry v and do through BLAS products, and a
BLAS may skip a zero operand (the reference BLAS does), which would drop a NaN at a
masked key: there v and do are checked up front (_needs_upfront_check).
tests/test_validation.py puts a NaN, inf and -inf at single entries of each, in every
form, both norms, masked and not, and gives the GEMM forms a kernel that drops them.
The results' own checks are fused into the kernels that store them: the routing's dx
kernels (every form: kernels._dx_and_sums_from_gemm, _log_density_backward_rows) and
the token scan's (gma_np.memory.scan._store_rows) sum o - o over what they store, 0
exactly when all of it is finite, so dq, dk, and on the scan o and dv, are read again
only when that sum says one of them is not finite.
"""

from dataclasses import dataclass

import numpy as np

from gma_np import _validation as check
from gma_np._numerics import ACCUM_DTYPE, CAUSAL_CHUNK, DEFAULT_EPS
from gma_np._workspace import scratch
from gma_np.memory.bidirectional import _bidirectional_backward, _bidirectional_forward
from gma_np.memory.chunked import causal_chunked_backward, causal_chunked_forward
from gma_np.memory.ops import causal_form
from gma_np.memory.scan import _causal_backward, _causal_forward, scan_checkpoints
from gma_np.mixers.gma.routing import check_gradients_finite, prepare_mixture, route_backward, route_forward

@dataclass
class GMACache:
    """Everything gma_backward needs. Stored: the routed queries and keys and V.
    Recomputed in the backward: the memory S, z (bidirectional: a write pass again;
    causal: the scan runs again from the states it kept every SCAN_CHECKPOINT_TOKENS
    tokens, O(N K e / 256) memory instead of O(N K e))."""
    shape: tuple            # (B, H, N, d, e, K)
    dtype: np.dtype         # dtype of q, k, v and of the output
    causal: bool
    slot: bool              # norm == "slot"
    eps: float
    mask: np.ndarray        # (B, N) float64 of 0/1
    masked: bool            # a key_mask was passed (else mask is all ones and rk a view of r)
    rq: np.ndarray          # (P, N, K) routed queries, in dtype (computed in float64)
    rk: np.ndarray          # (P, N, K) routed keys, masked (R~_K), in dtype
    v: np.ndarray           # (P, N, e) in dtype
    routing: object         # RoutingCache of the stacked (q, k) points, (2B, H, N, d), holding r
    checkpoints: tuple = None   # the token scan's states (gma_np.memory.scan.scan_checkpoints)


def _validate(q, k, v, means, log_var, logits, causal, norm, temperature, eps, key_mask):
    """The arguments of gma_forward checked and prepared, but for the finiteness of q, k
    and v: every caller runs the routing's check (q, k) and checks v, through the output
    or up front by the form (module docstring, "Finiteness")."""
    q, k, v = check.qkv(q, k, v, finite=False)
    mix = prepare_mixture(means, log_var, logits)
    B, H, N, d = q.shape
    check.mixture_matches("q", H, d, mix.means)
    tau, per_head = check.temperature(temperature, H)
    tau_dtype = temperature.dtype if isinstance(temperature, np.ndarray) else np.dtype(np.float64)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    norm = check.norm_value(norm)
    eps = check.eps_value(eps)
    mask = check.key_mask(key_mask, B, N)
    return q, k, v, mix, tau, per_head, tau_dtype, bool(causal), norm == "slot", eps, mask


def _form(causal, K, e):
    """"bidirectional", "chunked" or "scan": the form gma_forward and gma_backward take."""
    return causal_form(K, e) if causal else "bidirectional"


def _needs_upfront_check(form):
    """True where v and do go through BLAS products, whose propagation of a NaN the op
    does not rely on (module docstring, "Finiteness")."""
    return form != "scan"


def check_output_finite(o, eps, rq, v, slot, z_read, v_name="v", v_passed=None, finite=None):
    """Raise if o holds NaN or inf, naming the cause.

    o (P, N, e); rq (P, N, K) the routed queries; v (P, N, e); z_read(p, n) -> (K,) the
    normaliser z that query n of sequence p reads (prefix sums when causal). v_passed:
    v as passed ((B, H, N, e), named v_name), whose finiteness is checked here first
    (ValueError; module docstring, "Finiteness"); None: v was checked before. Finite
    inputs and finite responsibilities (checked by the routing) leave two causes
    (FloatingPointError): eps = 0 with a query that reads an empty memory (all keys
    masked so far: 0 / 0), or a memory S = sum_j r(k_j) v_j, or its read-out, beyond
    the float64 range (|v| near 1e308). finite: True where the kernel that wrote o found
    every entry finite (the scan's check sums), None to check o here.
    """
    if finite or (finite is None and check.all_finite(o)):
        return
    if v_passed is not None:
        check.check_finite(v_name, v_passed)
    p, n, _ = check.first_nonfinite(o)
    z = z_read(p, n)                                               # (K,)
    if slot:
        empty = bool(((rq[p, n] > 0) & (z + eps == 0)).any())
    else:
        empty = float(np.dot(rq[p, n], z)) + eps == 0
    if empty:
        raise FloatingPointError(
            f"gma: the output is not finite; with eps = {eps} a query that reads an empty memory "
            f"(all keys masked so far) divides 0 by 0: pass eps > 0")
    raise FloatingPointError(
        f"v: the output of the query at (p, n) = {(p, n)} (p = b H + h) overflows float64: the "
        f"memory sum_j r(k_j) v_j or its read-out exceeds {np.finfo(np.float64).max:.3g} "
        f"(|v| up to {float(np.abs(v).max()):.3g}): rescale v")


def _z_read(rk, causal, z0=None):
    """z_read(p, n) for check_output_finite: the normaliser query n of sequence p reads,
    from the routed keys rk (P, N, K) as written (masked) and an initial z0 (P, K)."""
    def z_read(p, n):
        z = rk[p, :n + 1].sum(axis=0, dtype=ACCUM_DTYPE) if causal else rk[p].sum(axis=0, dtype=ACCUM_DTYPE)
        return z if z0 is None else z + z0[p]
    return z_read


def gma_forward(q, k, v, means, log_var, logits, *, causal=False, norm="row",
                temperature=1.0, eps=DEFAULT_EPS, key_mask=None):
    """Gaussian Mixture Attention, returning the output and the cache for gma_backward.

    Parameters
    ----------
    q, k : arrays of shape (B, H, N, d), float32 or float64 (one dtype for q, k, v)
    v : array of shape (B, H, N, e)
    means : array of shape (H, K, d)
    log_var : array of shape (H, K, d) (diagonal) or (H, K) (spherical covariance)
    logits : array of shape (H, K)
    causal : bool, query i reads keys j <= i only (prefix scan)
    norm : "row" (default) or "slot", see the module docstring
    temperature : float > 0 or array of shape (H,)
    eps : float >= 0, added to the read-out denominators
    key_mask : bool array of shape (B, N), or None; False keys write nothing

    Returns
    -------
    o : array of shape (B, H, N, e), dtype of q
    cache : GMACache
    """
    (q, k, v, mix, tau, per_head, tau_dtype,
     causal, slot, eps, mask) = _validate(q, k, v, means, log_var, logits,
                                          causal, norm, temperature, eps, key_mask)
    B, H, N, d = q.shape
    e = v.shape[3]
    K = mix.means.shape[1]
    P = B * H
    form = _form(causal, K, e)
    # 1. route queries and keys through the same mixture in one call: (2B, H, N, d) stacked
    r, routing = route_forward((q, k), mix, tau, per_head, tau_dtype, names=("q", "k"))
    if _needs_upfront_check(form):                                 # after q, k: their errors first
        check.check_finite("v", v)
    rq = r[:B].reshape(P, N, K)                                    # (P, N, K)
    rk = r[B:]                                                     # (B, H, N, K)
    if key_mask is not None:
        rk = rk * mask.astype(rk.dtype)[:, None, :, None]          # R~_K (a copy; unmasked: a view)
    rk = rk.reshape(P, N, K)
    v3 = v.reshape(P, N, e)                                        # (P, N, e)
    # 2. write the memory and read it out
    finite = None                                                  # o checked below
    checkpoints = None
    if form == "chunked":
        o = causal_chunked_forward(rq, rk, v3, slot, eps, CAUSAL_CHUNK)
    elif form == "scan":
        sums = np.empty(P)                                         # sum of o - o per sequence
        checkpoints = scan_checkpoints(P, N, K, e)                 # for gma_backward
        o = _causal_forward(rq, rk, v3, slot, eps, sums, checkpoints)
        finite = bool(sums.sum() == 0)                             # the kernel checked o
    else:
        o = _bidirectional_forward(rq, rk, v3, slot, eps)
    check_output_finite(o, eps, rq, v3, slot, _z_read(rk, causal), v_passed=v, finite=finite)
    o = o.astype(q.dtype, copy=False).reshape(B, H, N, e)
    cache = GMACache(shape=(B, H, N, d, e, K), dtype=q.dtype, causal=causal, slot=slot,
                     eps=eps, mask=mask, masked=key_mask is not None, rq=rq, rk=rk, v=v3,
                     routing=routing, checkpoints=checkpoints)
    return o, cache


def gma_backward(do, cache):
    """Gradients of sum(o * do) with respect to every differentiable input of gma_forward.

    Parameters
    ----------
    do : array of shape (B, H, N, e), the cotangent of o
    cache : GMACache from gma_forward

    Returns
    -------
    dict with keys "q", "k", "v", "means", "log_var", "logits", "temperature",
    each in the shape that was passed to gma_forward ("temperature" a float or
    an (H,) array).
    """
    check.cache("cache", cache, GMACache, "gma_forward")
    B, H, N, d, e, K = cache.shape
    P = B * H
    do = check.float_array("do", do, ndim=4, finite=False)          # checked below
    check.check_shape("do", do, (B, H, N, e), "the shape of o, (B, H, N, e)")
    form = _form(cache.causal, K, e)
    if _needs_upfront_check(form):
        check.check_finite("do", do)
    do3 = do.astype(cache.dtype, copy=False).reshape(P, N, e)
    # dr (2B, H, N, K) holds drq in [:B] and drk in [B:], the stacking of the routing; every
    # entry is written below, and kept from call to call (its pages: gma_np._workspace)
    dr = scratch("gma_backward.dr", (2 * B, H, N, K), cache.rq.dtype)
    finite = []                                                    # checked by their kernels
    # 2. backward through the memory read and write
    if form == "chunked":
        dv = causal_chunked_backward(cache.rq, cache.rk, cache.v, do3, cache.slot, cache.eps,
                                     CAUSAL_CHUNK, dr[:B].reshape(P, N, K), dr[B:].reshape(P, N, K))
    elif form == "scan":
        dv_sums = np.empty(P)                                      # sum of o - o over dv
        dv = _causal_backward(cache.rq, cache.rk, cache.v, do3, cache.slot, cache.eps,
                              dr[:B].reshape(P, N, K), dr[B:].reshape(P, N, K), dv_sums,
                              cache.checkpoints)
        if dv_sums.sum() == 0:                                     # the kernel checked dv
            finite.append("v")
    else:
        dv = _bidirectional_backward(cache.rq, cache.rk, cache.v, do3, cache.slot, cache.eps,
                                     dr[:B].reshape(P, N, K), dr[B:].reshape(P, N, K))
    if cache.masked:
        # in the forward pass this was: rk = mask * r(k); an inf from a non-finite do
        # times 0 is NaN here, reported below
        with np.errstate(invalid="ignore"):
            dr[B:] *= cache.mask[:, None, :, None]
    # 1. backward through the routing of the stacked (q, k)
    dx_sum = np.empty(1)                                           # sum of o - o over dx
    grads = route_backward(dr, cache.routing, dx_sum)
    if dx_sum[0] == 0:                                             # the kernels checked dx
        finite += ["q", "k"]
    dx = grads.pop("x")
    grads["q"] = dx[:B]
    grads["k"] = dx[B:]
    grads["v"] = dv.astype(cache.dtype, copy=False).reshape(B, H, N, e)
    check_gradients_finite(grads, "do", do, finite)
    return grads


def gma(q, k, v, means, log_var, logits, *, causal=False, norm="row",
        temperature=1.0, eps=DEFAULT_EPS, key_mask=None):
    """Gaussian Mixture Attention: o (B, H, N, e). See gma_forward for the arguments."""
    return gma_forward(q, k, v, means, log_var, logits, causal=causal, norm=norm,
                       temperature=temperature, eps=eps, key_mask=key_mask)[0]
