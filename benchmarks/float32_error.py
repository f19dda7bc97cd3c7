"""float32 against float64 error of causal GMA as the sequence grows.

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K components.

For each N (doubling up to --max-n) and each read-out norm ("row", "slot"),
one random float32 problem (q, k, v and the mixture all float32) is run twice
through gma_np.gma(..., causal=True): once as it is, once with the same values
upcast to float64. Per output row i (one token of one head):

    err_i = ||o32_i - o64_i|| / ||o64_i||

and the table shows the worst err_i, the median, the worst over the last 1024
rows (where the prefix sums S_t, z_t are longest), and the fraction of output
elements of the float32 run that equal the float64 output rounded once to
float32 ("= fl32(o64)").

The column "f32-state worst" is NOT gma_np: it is an emulation, in NumPy, of
the same causal read-out with the memory S_t, z_t accumulated in float32 (a
sequential np.cumsum in float32, from the same float32 responsibilities), i.e.
what a port that keeps its scan state in the input dtype would get. It shows
what gma_np's float64 accumulators (gma_np._numerics.ACCUM_DTYPE) buy.
Skip it with --no-emulation.

The column "f32-GEMM routing worst" is NOT gma_np either: it emulates gma_np
with its routing GEMM, [x', x'^2] @ [-2 (mu' w)^T ; w^T] on the centred points
(gma_np.mixers.gma.routing), taken in float32 instead of float64, and everything
else as gma_np does it (float64 softmax and scan state). It is what the 2x
faster float32 GEMM would cost in accuracy, and why the routing GEMMs stay
float64 for float32 inputs (docs/performance.md).

    python benchmarks/float32_error.py                       # N = 1024 .. 65536, d=e=K=16, H=2
    python benchmarks/float32_error.py --d 64 --e 64 --K 32 --max-n 16384
"""

import argparse

import numpy as np

import gma_np

LAST_ROWS = 1024


def make_inputs(N, B, H, d, e, K, seed=0):
    """A random float32 causal-GMA problem: a dict of the differentiable inputs."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return dict(
        q=rng.standard_normal((B, H, N, d)).astype(f32),           # (B, H, N, d)
        k=rng.standard_normal((B, H, N, d)).astype(f32),           # (B, H, N, d)
        v=rng.standard_normal((B, H, N, e)).astype(f32),           # (B, H, N, e)
        means=rng.standard_normal((H, K, d)).astype(f32),          # (H, K, d)
        log_var=(0.3 * rng.standard_normal((H, K, d))).astype(f32),  # (H, K, d)
        logits=(0.5 * rng.standard_normal((H, K))).astype(f32),    # (H, K)
    )


def float32_state_emulation(inputs, norm, eps=1e-6):
    """Causal read-out with S_t, z_t accumulated in float32 (not what gma_np does)."""
    mix = {n: inputs[n] for n in ("means", "log_var", "logits")}
    rq = gma_np.responsibilities(inputs["q"], **mix)               # (B, H, N, K) float32
    rk = gma_np.responsibilities(inputs["k"], **mix)               # (B, H, N, K) float32
    v = inputs["v"]                                                # (B, H, N, e) float32
    B, H, N, K = rq.shape
    out = np.empty(v.shape, dtype=np.float32)
    eps32 = np.float32(eps)
    for b in range(B):
        for h in range(H):
            S = np.cumsum(rk[b, h, :, :, None] * v[b, h, :, None, :], axis=0,
                          dtype=np.float32)                        # (N, K, e) S_t
            z = np.cumsum(rk[b, h], axis=0, dtype=np.float32)      # (N, K) z_t
            if norm == "slot":
                out[b, h] = np.einsum("nk,nke->ne", rq[b, h] / (z + eps32), S)
            else:
                num = np.einsum("nk,nke->ne", rq[b, h], S)         # (N, e)
                den = (rq[b, h] * z).sum(-1, keepdims=True) + eps32
                out[b, h] = num / den
            del S
    return out


def float32_gemm_routing_emulation(inputs, norm, eps=1e-6):
    """Causal GMA with the routing GEMM of gma_np taken in float32 (not what gma_np does)."""
    from gma_np.memory.scan import _causal_forward
    from gma_np.mixers.gma.routing import prepare_mixture
    mix = prepare_mixture(inputs["means"], inputs["log_var"], inputs["logits"])
    B, H, N, _ = inputs["q"].shape
    K = mix.means.shape[1]
    r = []
    for x in (inputs["q"], inputs["k"]):
        xc = x.astype(np.float64) - mix.center[None, :, None, :]   # (B, H, N, d) x' = x - c
        feats = np.concatenate([xc, xc * xc], axis=-1).astype(np.float32)   # (B, H, N, 2d)
        g = np.matmul(feats, mix.w_forward.astype(np.float32))    # (B, H, N, K) float32 GEMM
        l = mix.const[None, :, None, :] - 0.5 * (g.astype(np.float64) + mix.m2[None, :, None, :])
        a = np.exp(l - l.max(-1, keepdims=True))
        r.append((a / a.sum(-1, keepdims=True)).astype(np.float32).reshape(B * H, N, K))
    v = inputs["v"].reshape(B * H, N, -1)
    return _causal_forward(r[0], r[1], v, norm == "slot", eps).reshape(inputs["v"].shape)


def row_errors(o, o64):
    """err_i = ||o_i - o64_i|| / ||o64_i|| for every row, shape (B, H, N)."""
    diff = np.linalg.norm(o.astype(np.float64) - o64, axis=-1)
    return diff / np.linalg.norm(o64, axis=-1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-n", type=int, default=1024, help="first N (default 1024)")
    parser.add_argument("--max-n", type=int, default=65536, help="last N (default 65536)")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=2)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--e", type=int, default=16)
    parser.add_argument("--K", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-emulation", action="store_true",
                        help="skip the float32-state emulation column")
    a = parser.parse_args(argv)
    if a.min_n < 1 or a.max_n < a.min_n:
        parser.error(f"--min-n/--max-n: expected 1 <= min-n <= max-n, got {a.min_n}, {a.max_n}")

    print(f"causal GMA, float32 vs float64 on the same values; B={a.B} H={a.H} "
          f"d={a.d} e={a.e} K={a.K}; err_i = ||o32_i - o64_i|| / ||o64_i|| per row")
    print(f"{'norm':<5} {'N':>7} {'worst':>10} {'median':>10} {'worst last':>11} "
          f"{'= fl32(o64)':>12} {'f32-state worst':>16} {'f32-state last':>15}"
          f" {'f32-GEMM routing worst':>23} {'f32-GEMM last':>14}")
    for norm in ("row", "slot"):
        N = a.min_n
        while N <= a.max_n:
            x32 = make_inputs(N, a.B, a.H, a.d, a.e, a.K, seed=a.seed)
            x64 = {n: x.astype(np.float64) for n, x in x32.items()}
            o32 = gma_np.gma(**x32, causal=True, norm=norm)        # (B, H, N, e) float32
            o64 = gma_np.gma(**x64, causal=True, norm=norm)        # (B, H, N, e) float64
            err = row_errors(o32, o64)                             # (B, H, N)
            same = float((o32 == o64.astype(np.float32)).mean())
            last = err[:, :, -LAST_ROWS:]
            line = (f"{norm:<5} {N:>7} {err.max():>10.2e} {np.median(err):>10.2e} "
                    f"{last.max():>11.2e} {same:>12.4f}")
            if not a.no_emulation:
                emu = row_errors(float32_state_emulation(x32, norm), o64)
                line += f" {emu.max():>16.2e} {emu[:, :, -LAST_ROWS:].max():>15.2e}"
                emu = row_errors(float32_gemm_routing_emulation(x32, norm), o64)
                line += f" {emu.max():>23.2e} {emu[:, :, -LAST_ROWS:].max():>14.2e}"
            print(line, flush=True)
            N *= 2


if __name__ == "__main__":
    main()
