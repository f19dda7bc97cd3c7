"""Write the golden-vector bundle: one .npz per case and manifest.json, deterministically.

The bundle (docs/vectors.md):

    DIR/manifest.json          format, versions, seed, every case's config, arrays
                               (shape, dtype, role), tolerances, and the sha256 of every file
    DIR/<case name>.npz        a plain zip of .npy files (stored, not compressed),
                               one per array, no object arrays

Same command, same bytes: np.savez stamps every zip entry with the current
time, so the archive is written here with zipfile and a fixed date, fixed
permissions and a fixed entry order; .npy headers hold only dtype, order and
shape, and the manifest is JSON with sorted keys and no clock in it.
"""

import hashlib
import io
import json
import os
import zipfile

import numba
import numpy as np

from gma_np import __version__
from gma_np._threads import set_numba_threads
from gma_np.vectors import FORMAT_NAME, FORMAT_VERSION, MANIFEST
from gma_np.vectors.cases import MATRICES, Case
from gma_np.vectors.golden import (CHECKED, GRADIENTS, INPUTS, INTERMEDIATES, KAPPA_SAMPLES,
                                   LAMBDA, OUTPUTS, PERTURBATION, UNIT_ROUNDOFF, golden_case)

# The date every zip entry carries: the earliest a zip can hold.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def role_of(name):
    """What an array of the bundle is: input, input_f32, cotangent, intermediate, output, gradient."""
    if name.endswith("_f32"):
        return "input_f32"
    if name in INPUTS or name == "key_mask":
        return "input"
    if name == "do":
        return "cotangent"
    if name in INTERMEDIATES or name == "memory_positions":
        return "intermediate"
    if name in OUTPUTS:
        return "output"
    if name in GRADIENTS:
        return "gradient"
    raise ValueError(f"array name: unknown {name!r}")


def npz_bytes(arrays):
    """The bytes of an uncompressed .npz holding `arrays` in the order given, deterministically."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            arr = np.asarray(arr, order="C")          # (ascontiguousarray would make 0-d 1-d)
            if arr.dtype.hasobject:
                raise TypeError(f"{name}: object arrays are not allowed in the bundle")
            npy = io.BytesIO()
            np.lib.format.write_array(npy, arr, version=(1, 0), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3                     # unix, whatever the platform
            info.external_attr = 0o100644 << 16        # a regular file, rw-r--r--
            zf.writestr(info, npy.getvalue())
    return buf.getvalue()


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def build_bundle(matrix="default", seed=0, progress=None):
    """(manifest dict, {file name: bytes}) of the bundle, without touching the disk.

    matrix is "default", "quick", or a list of gma_np.vectors.cases.Case (then the
    manifest says "custom").
    """
    if isinstance(matrix, str):
        if matrix not in MATRICES:
            raise ValueError(f"matrix: expected one of {tuple(MATRICES)} or a list of Case, "
                             f"got {matrix!r}")
        matrix_cases = MATRICES[matrix]()
    else:
        matrix_cases = list(matrix)
        if not matrix_cases or not all(isinstance(c, Case) for c in matrix_cases):
            raise ValueError(f"matrix: expected one of {tuple(MATRICES)} or a non-empty list "
                             f"of Case, got {matrix!r}")
        if len({c.name for c in matrix_cases}) != len(matrix_cases):
            raise ValueError("matrix: two cases have the same name")
        matrix = "custom"
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    # One Numba thread: the cases are small, and waking the thread pool for each of the
    # ~240 small kernel calls costs more than their work, many times the whole export on
    # a loaded machine (docs/vectors.md, "Size and time"). It also keeps the bytes
    # independent of the machine's thread count.
    threads = numba.get_num_threads()
    set_numba_threads(1)
    try:
        return _build(matrix, matrix_cases, seed, progress)
    finally:
        numba.set_num_threads(threads)


def _build(matrix, matrix_cases, seed, progress):
    files, cases = {}, []
    for i, case in enumerate(matrix_cases):
        if progress is not None:
            progress(i, len(matrix_cases), case)
        arrays, meta = golden_case(case, seed)
        file_name = case.name + ".npz"
        data = npz_bytes(arrays)
        files[file_name] = data
        cases.append(dict(
            name=case.name, file=file_name, sha256=sha256_bytes(data), config=case.config(),
            arrays={name: dict(role=role_of(name), shape=list(arr.shape), dtype=arr.dtype.name)
                    for name, arr in arrays.items()},
            checked={name: meta[name] for name in CHECKED}))
    manifest = dict(
        format=FORMAT_NAME, format_version=FORMAT_VERSION, gma_np_version=__version__,
        matrix=matrix, seed=seed,
        tolerance_model=dict(
            formula="max|got - expected| / scale <= tol[dtype] = lambda * u[dtype] * (kappa "
                    "* (sqrt(n_terms) + sqrt(d + e + K)) + rounding_bound)",
            unit_roundoff=UNIT_ROUNDOFF, **{"lambda": LAMBDA}, perturbation=PERTURBATION,
            kappa_samples=KAPPA_SAMPLES),
        cases=cases,
        files={name: sha256_bytes(data) for name, data in files.items()})
    return manifest, files


def manifest_bytes(manifest):
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")


def export_bundle(directory, matrix="default", seed=0, progress=None):
    """Write the bundle into `directory` (created if missing; existing bundle files are
    overwritten, other files are left alone). Returns the manifest."""
    manifest, files = build_bundle(matrix, seed, progress)
    os.makedirs(directory, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    with open(os.path.join(directory, MANIFEST), "wb") as f:
        f.write(manifest_bytes(manifest))
    return manifest
