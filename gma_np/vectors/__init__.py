"""Golden vectors: the ground truth a port of GMA checks itself against.

cases      the case matrix (configurations x numerical regimes) and how each
           case's inputs are drawn
golden     the tensors of one case (inputs, cotangent, intermediates, outputs,
           gradients) and their tolerances, derived from an error analysis
export     writes the versioned bundle: one .npz per case and manifest.json,
           byte for byte deterministic
check      reads a bundle (checksums first), runs a port on it, compares

The bundle format is documented in docs/vectors.md, the way to use it in
docs/port-guide.md. The public comparison functions for a port's own test
suite are in gma_np.testing.
"""

FORMAT_NAME = "gma-np-vectors"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"           # the bundle's index, beside one .npz per case
