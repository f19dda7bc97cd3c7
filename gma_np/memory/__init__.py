"""The feature memory: the op GMA, linear attention and the Performer share.

Per sequence, from query features rq (N, F), masked key features rk (N, F) and values
v (N, e): write S = rk^T v (F, e) and z = rk^T 1 (F,) (prefix sums when causal), read
o_i = (rq_i S) / (rq_i . z + eps) (row) or sum_f rq_i[f] S[f] / (z[f] + eps) (slot).

    ops.py            the wrappers the mixers call: memory_forward / memory_backward,
                      memory_recurrent / memory_step, the decoding state, causal_form
    bidirectional.py  the bidirectional form: float64 GEMMs, one block of tokens at a time
    scan.py           the causal form by a Numba prefix scan and its reverse-scan backward
    chunked.py        the causal chunked form: BLAS products over chunks of tokens
    step.py           private Numba kernel of one decoding token: write, then read
    reference.py      the naive forms: the dense N x N mix and the loop over t

Nothing here knows a mixer: each mixer turns its queries and keys into features and
chains the gradients of the features through its own feature map.
"""
