"""Named numeric constants of gma_np, each with the reason it has its value.

Every magic number the package uses lives here, so that a port can copy them
and a reader can find why they are what they are.
"""

import math

import numpy as np

# log(2 pi): the constant term of a Gaussian log-density, per dimension.
LOG_2PI = math.log(2.0 * math.pi)

# Default eps of the read-out denominators (definition, section 2). It keeps
# O finite when a query routes to slots that nothing was written to yet
# (first tokens of a causal sequence, all-padding keys): then O = 0 / eps = 0.
DEFAULT_EPS = 1e-6

# Floating dtypes the engine computes in. Everything else is rejected at the
# public boundary with a clear error (never cast silently: an integer q is
# almost always a bug in the caller).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Dtype of every accumulator: the log-densities l_k(x) (a sum over d terms),
# the memory S and normalizer z (sums over N tokens) and parameter gradients
# (sums over B*N tokens). float32 inputs keep float64-grade accuracy where the
# error would otherwise grow with d or N; see docs/numerics.md.
ACCUM_DTYPE = np.dtype(np.float64)

# Finite-difference defaults of gma_np.gradcheck (docs/gradcheck.md).
# The 5-point central stencil has truncation error O(h^4) and rounding error
# O(eps_64 |f| / h); h = 1e-3 balances the two at about 1e-12 relative.
FD_STEP = 1e-3
# Relative tolerance a float64 gradient must meet: a million times the stencil's own
# error at FD_STEP, so rounding never trips it, while a wrong or missing term of a
# derivation shows as an error of order 1.
GRADCHECK_RTOL = 1e-6
# Absolute floor of the comparison, in units of the estimated rounding error
# of the stencil (eps_64 * sum|out * dout| / h): below it no difference is
# meaningful. Measured noise on the gma_np.selfcheck problems is 10-100 times
# below eps_64 * sum|out * dout| / h, so a factor 10 leaves a margin of 100+.
GRADCHECK_NOISE_FACTOR = 10.0
# Above this many scalar inputs, gradcheck(mode="auto") switches from
# checking every element to random directional derivatives.
GRADCHECK_MAX_FULL_ELEMENTS = 4096

# Tolerances the test-suite states per dtype when comparing two exact forms
# (dense vs naive vs fast) of the same computation.
RTOL_EXACT = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6}

# Fast routing (gma_np.mixers.gma.routing.log_density): the quadratic term is the GEMM
# expansion x'^2 @ inv_var^T - 2 x' @ (mu' inv_var)^T + m2 on points centred at
# the mean of their head's means. Its rounding error in l = const - quad / 2 is
# about eps (x2 + m2) / 2; the direct form's about eps (|const| + quad / 2), the
# rounding of l's own terms. An entry where x2 + m2 > BOUND * max(quad + 2 |const|, 1)
# (the expansion could lose more than log2(BOUND) = 1 bit against the direct form)
# is recomputed directly. With 1 bit the log-densities are within about two units
# of the direct form's rounding error in every regime that tests/test_regimes.py
# sweeps (widths e^-14 to e^6, data scales 1e-3 to 30, mixtures far from the data);
# a bound of 4 let the error reach 4 times the direct form's there. On data near
# its mixture, centred, the fallback rarely fires: never on the benchmark's
# problems (docs/numerics.md, section 2).
EXPANSION_CANCELLATION_BOUND = 2.0
# The backward's GEMMs expand the same sums (dx = dl @ (mu' inv_var) - x' (dl @ inv_var),
# and dl^T x'^2 - 2 mu' dl^T x' + mu'^2 sum dl for the log-variances), with the same
# error, eps (x2 + m2), against the direct form's eps quad; there no |const| term
# hides it. A token with an entry where |x'|^2 max_j inv_var + m2 > BOUND * quad takes
# its gradient in the direct form (gma_np.mixers.gma.routing.log_density_backward). The
# left side bounds x2 + m2 from above, by about 2x on data near its mixture (the
# largest inverse variance against their mean), so 4 is about 1 bit of x2 + m2 against
# quad: at 2, 93% of the tokens of the benchmark's problems (bench_gma.py) were
# marked for no cancellation; at 4, none, and tests/test_regimes.py holds.
GRADIENT_CANCELLATION_BOUND = 4.0
# The same bound when every gradient is returned in float32 (the points, the mixture
# parameters and an array temperature all float32, as in the trainer): the GEMMs
# still run in float64, and a loss of log2(BOUND) = 16 bits of float64's 53 leaves
# 37, 13 below float32's 24 (the expansion's error, eps_64 * 2^16 = 2^-37 of the
# sizes, is under 2^-13 of a float32 rounding). At 4 the trainer's tokens, which sit
# close to their fitted means, were 12-34% marked (tiny preset, float32) and their
# gradients took the direct form at about twice the GEMM form's cost for nothing
# a float32 result can hold; tests/test_fastpaths.py holds the float32 gradients of
# tokens next to sharp means far from the centre to the float64 direct form.
GRADIENT_CANCELLATION_BOUND_FLOAT32 = 2.0 ** 16

# Kernel calls with fewer multiply-adds than this run on one thread
# (gma_np._threads.threads_for). Waking Numba's thread pool costs tens of
# microseconds on an idle machine and, measured on a loaded 2-core machine,
# ~20 ms per parallel kernel call: a causal fwd+bwd at B=2, H=2, N=37 took
# 140 ms with 2 threads and 0.7 ms with 1. 2^20 multiply-adds is about a
# millisecond of one core, where a second thread cannot win much anyway.
PARALLEL_MIN_WORK = 2 ** 20

# Tokens per block of the routing GEMMs (gma_np.mixers.gma.routing._blocks), at most: the
# features [x', x'^2] and the GEMM results exist one block at a time, so the routing's
# temporaries are O(block), not O(N); only r (and dr) are (N, K). 128 rows of 2d = 128
# float64 features per (batch, head) are 128 KiB, in L2 with the GEMM results for the
# fused pass after them. Causal fwd+bwd, B=1 H=4 d=K=e=64 float32, interleaved medians:
# one thread, N=8192: 394 ms (128) vs 433 (256), 500 (1024), 633 (4096). (Until the
# bound below, a quarter of a block was used below N = 32 ROUTING_BLOCK, for memory.)
ROUTING_BLOCK = 128

# Multiply-adds of one routing GEMM (per sequence and head: tokens x 2d x K) at most, which
# bounds the tokens of a block further. NumPy's OpenBLAS (0.3.31, this 2-core Zen 4) runs a
# dgemm of at most 10^6 multiply-adds through its small-matrix path: (tokens, 128) @ (128,
# 64) on one thread, in cache, 27.0-27.7 GMAC/s up to 122 tokens (999,424), 21.9-22.6 from
# 123 (all three of the routing's GEMM shapes alike). Causal fwd+bwd, B=1 H=4 d=K=e=64
# float32, two threads, the paired ratio against the blocks before (128 tokens, a quarter
# of that below N = 4096) in each round, medians of 25 rounds in one process: 0.94x at
# N = 1024 and at N = 8192; on one thread the routing's GEMMs at N = 8192 took 63.5 ms in
# place of 79-80. The trainer's shapes (tiny: d = 32, K = 16, 976 tokens by this bound)
# keep ROUTING_BLOCK.
ROUTING_SMALL_GEMM = 10 ** 6

# Rows (sequences x heads x tokens) per block of the routing at most: a block takes as
# many of the stacked sequences as keep p_count * H * tokens within this (at least one
# sequence), so that its float64 temporaries stay in L2 whatever P * H is. 1024 holds a
# block of the op's shape (P * H = 8 sequences of up to 122 tokens at d = K = 64).
# Routing of stacked (q, k), float32, one thread, tiny preset's shape (P = 64, H = 4,
# N = 128, d = 32, K = 16), fwd + bwd, interleaved medians of 7: 12.4 ms (512 rows),
# 11.1 (1024), 12.3 (2048), 13.2 (4096); the routing before the split (a block =
# 32 tokens of all 256 sequences, 4 MB of features) 25 ms in the same run.
ROUTING_ROWS = 1024

# The blocks of tokens of the routing and of the bidirectional mixing are dealt
# round-robin to this many streams, which run on Python threads when Numba has more
# than one thread (gma_np._threads.run_streams), each with BLAS on one thread.
# Fixed, not the thread count, so that the sums over blocks (added in a fixed order)
# are bit for bit the same whatever the thread count. 2: the machines this was
# measured on have 2 cores.
BLOCK_STREAMS = 2

# Tokens per block of the bidirectional mixing GEMMs (gma_np.memory.bidirectional): rq, rk, v
# and do are read one block at a time and widened to float64 there, so the float64
# temporaries are O(P * block * (K + e)), never a float64 copy of an (N, K) or (N, e)
# array. 256 rows keep each GEMM large enough for BLAS (1024 rows would raise the
# traced peak of a bidirectional fwd+bwd at N = 1024 from 12.3 to 13.5 MB, above
# torch's); fewer below N = 2048, down to 64: four blocks per stream keep the
# float64 block temporaries a small share of the memory there.
MIXING_BLOCK = 256

# Causal mixing has two forms (gma_np.memory.ops.causal_form): the Numba token scan
# (gma_np.memory.scan) and the chunked BLAS form (gma_np.memory.chunked). The chunked
# form does the scan's work plus C (4K + 3e) multiply-adds per token, in float64
# matrix products of a few dozen rows; it wins only where K e is large enough for
# those products to beat the fused scan loop. Measured (benchmarks/causal_forms.py,
# row, P = 4, N = 4096, chunk 64, medians of 5 interleaved, forward+backward
# chunked / scan): K = e = 64: 1.98 (float32) 1.96 (float64); 128: 1.20, 1.12;
# 192: 1.06, 0.95; 256: 0.95, 0.93. So the chunked form is used from K e >= 256^2.
CHUNKED_MIN_KE = 256 * 256
# Tokens per chunk of the chunked form: 64 was the fastest of 16, 32, 64, 128 at
# K = e >= 128 (32 as fast up to 128; 16 pays per-product overhead, 128 the C^2 terms).
CAUSAL_CHUNK = 64
# Tokens per group of chunks of the chunked form: the float64 buffers of one group
# (inputs, F, A, the chunk states) are what it allocates beyond its O(N) arrays, so
# the group, not N, sets them: ~4 MiB for the forward at P = 4, K = e = 64, C = 64.
# Measured on one thread, causal forward + backward, P = 4, N = 8192, C = 32 or 64,
# interleaved: 128 to 512 tokens within noise of each other, 2048 tokens 20-60%
# slower (K = e = 64 and 128), 1024 about as fast at K = e <= 32.
CHUNK_GROUP_TOKENS = 256
