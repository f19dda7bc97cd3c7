"""Check a port against a golden-vector bundle: checksums first, then every tensor.

The port form (docs/vectors.md, "The port function"):

    forward(q, k, v, means, log_var, logits, *, causal, norm, temperature, eps, key_mask) -> o
    backward(do, q, k, v, means, log_var, logits, *, causal, norm, temperature, eps, key_mask)
        -> dict with keys "q", "k", "v", "means", "log_var", "logits", "temperature"
    responsibilities(x, means, log_var, logits, temperature) -> r          (optional)

Arrays come in the dtype under test (float64 or float32), key_mask as a
(B, N) bool array or None, temperature as a Python float or an (H,) array.
Results may be anything np.asarray accepts (a framework's tensor after
.numpy()); they are compared in float64 with

    max abs error   max_i |got_i - expected_i|
    max rel error   max_i |got_i - expected_i| / |expected_i| over the elements with
                    |expected_i| >= REL_FLOOR * scale (informative only)
    rms ratio       rms(got) / rms(expected) (a wrong scale shows at once; 1 when right)
    error / scale   max abs error / scale, scale = max_i |expected_i|: the statistic
                    held to the tolerance of the manifest
"""

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from gma_np.mixers.gma.configurations import GRADIENT_NAMES
from gma_np.vectors import FORMAT_NAME, FORMAT_VERSION, MANIFEST

DTYPES = ("float64", "float32")
# Elements smaller than this fraction of the tensor's scale are left out of the
# (informative) max relative error: their relative error means nothing.
REL_FLOOR = 1e-3
GRAD_KEYS = GRADIENT_NAMES


class BundleError(Exception):
    """The bundle is damaged, incomplete or of an unknown format; the message names the file."""


@dataclass
class TensorResult:
    """The comparison of one tensor of one case in one dtype."""
    case: str
    dtype: str
    tensor: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    rms_ratio: float = float("nan")
    err_scale: float = float("nan")   # max_abs / scale: the statistic that is held to tol
    tol: float = float("nan")
    ok: bool = False
    error: str = ""                   # why the comparison could not be made (exception, shape)


@dataclass
class CheckReport:
    """Every TensorResult of a check, in order."""
    bundle: str
    rows: list = field(default_factory=list)

    @property
    def ok(self):
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def failures(self):
        return [r for r in self.rows if not r.ok]

    def format(self, failures_only=False):
        return format_report(self, failures_only)


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory):
    """The manifest of the bundle in `directory`, after checking its format."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise BundleError(f"{MANIFEST}: missing from {directory!r} (is it a bundle written by "
                          f"`gma-np vectors export`?)")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{MANIFEST}: damaged, not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{MANIFEST}: expected format {FORMAT_NAME!r}, "
                          f"got {manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{MANIFEST}: expected format_version {FORMAT_VERSION}, got "
                          f"{manifest.get('format_version')!r} (use the gma_np that wrote it)")
    for key in ("cases", "files"):
        if key not in manifest:
            raise BundleError(f"{MANIFEST}: damaged, no {key!r} entry")
    return manifest


def verify_bundle(directory):
    """Check the sha256 of every file the manifest lists; return the manifest.

    Raises BundleError naming every damaged or missing file.
    """
    manifest = read_manifest(directory)
    problems = []
    for name, digest in sorted(manifest["files"].items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: missing")
            continue
        got = _sha256_file(path)
        if got != digest:
            problems.append(f"{name}: damaged (sha256 {got[:16]}..., manifest says {digest[:16]}...)")
    listed = set(manifest["files"])
    for case in manifest["cases"]:
        if case.get("file") not in listed:
            problems.append(f"{MANIFEST}: case {case.get('name')!r} names file "
                            f"{case.get('file')!r}, which has no checksum")
    if problems:
        raise BundleError("bundle " + repr(directory) + " failed its checksums:\n  "
                          + "\n  ".join(problems))
    return manifest


def load_case(directory, case):
    """The arrays of one case (a manifest entry) as a dict name -> ndarray."""
    path = os.path.join(directory, case["file"])
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    for name, spec in case["arrays"].items():
        if name not in arrays:
            raise BundleError(f"{case['file']}: array {name!r} missing")
        if list(arrays[name].shape) != spec["shape"] or arrays[name].dtype.name != spec["dtype"]:
            raise BundleError(f"{case['file']}: array {name!r} has shape {arrays[name].shape} "
                              f"and dtype {arrays[name].dtype}, manifest says {spec}")
    return arrays


def port_inputs(arrays, config, dtype):
    """(positional inputs, keyword arguments) of the port function for one case and dtype."""
    cast = (lambda x: x.astype(np.float32)) if dtype == "float32" else (lambda x: x)
    args = [cast(arrays[name]) for name in ("q", "k", "v", "means", "log_var", "logits")]
    tau = cast(arrays["temperature"])
    kwargs = dict(causal=bool(config["causal"]), norm=config["norm"], eps=float(config["eps"]),
                  temperature=tau if config["temperature"] == "per_head" else float(tau),
                  key_mask=arrays["key_mask"].astype(bool) if config["masked"] else None)
    return args, kwargs


def compare_tensor(got, expected, tol, case="", dtype="", tensor=""):
    """Compare one tensor; return a TensorResult (ok when err_scale <= tol)."""
    row = TensorResult(case=case, dtype=dtype, tensor=tensor, tol=float(tol))
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        row.error = f"not convertible to a float array ({exc})"
        return row
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        row.error = f"shape {got.shape}, expected {expected.shape}"
        return row
    if not np.isfinite(got).all():
        row.error = f"{int((~np.isfinite(got)).sum())} non-finite values"
        return row
    diff = np.abs(got - expected)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    scale = scale if scale > 0 else 1.0
    row.max_abs = float(diff.max()) if diff.size else 0.0
    big = np.abs(expected) >= REL_FLOOR * scale
    row.max_rel = float((diff[big] / np.abs(expected[big])).max()) if big.any() else 0.0
    rms_exp = float(np.sqrt(np.mean(expected ** 2))) if expected.size else 0.0
    rms_got = float(np.sqrt(np.mean(got ** 2))) if got.size else 0.0
    row.rms_ratio = rms_got / rms_exp if rms_exp > 0 else (1.0 if rms_got == 0 else float("inf"))
    row.err_scale = row.max_abs / scale
    row.ok = bool(row.err_scale <= tol)
    return row


def _call(fn, *args, **kwargs):
    """fn(*args, **kwargs), or (None, "ExceptionName: message")."""
    try:
        return fn(*args, **kwargs), ""
    except Exception as exc:     # a port's failure is a result, not a crash of the checker
        return None, f"{type(exc).__name__}: {exc}"


def check_port(directory, forward, backward=None, responsibilities=None, dtypes=("float64",),
               cases=None):
    """Run a port on every case of a bundle and compare; return a CheckReport.

    Parameters
    ----------
    directory : path of a bundle written by `gma-np vectors export`
    forward : the port's gma, in the port form (module docstring)
    backward : its backward in the port form, or None to check outputs only
    responsibilities : its routing, responsibilities(x, means, log_var, logits,
        temperature) -> r (..., H, N, K), or None
    dtypes : the dtypes to run the port in, a subset of ("float64", "float32")
    cases : None for all cases, or a substring (or list of names) selecting cases

    Raises BundleError (naming the file) if the bundle fails its checksums.
    """
    if not callable(forward):
        raise TypeError(f"forward: expected a callable, got {type(forward).__name__}")
    for name, fn in (("backward", backward), ("responsibilities", responsibilities)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}: expected a callable or None, got {type(fn).__name__}")
    dtypes = (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"dtypes: expected a subset of {DTYPES}, got {dtypes!r}")
    manifest = verify_bundle(directory)
    selected = [c for c in manifest["cases"] if _selected(c["name"], cases)]
    if not selected:
        raise ValueError(f"cases: {cases!r} selects none of the {len(manifest['cases'])} cases")
    report = CheckReport(bundle=str(directory))
    for case in selected:
        arrays = load_case(directory, case)
        checked = case["checked"]
        for dt in dtypes:
            args, kwargs = port_inputs(arrays, case["config"], dt)
            results = []
            if responsibilities is not None:
                for x_name, r_name in (("q", "r_q"), ("k", "r_k")):
                    x = args[("q", "k").index(x_name)]
                    r, err = _call(responsibilities, x, *args[3:6], kwargs["temperature"])
                    results.append((r_name, r, err))
            o, err = _call(forward, *args, **kwargs)
            results.append(("o", o, err))
            if backward is not None:
                do = arrays["do"].astype(np.float32) if dt == "float32" else arrays["do"]
                grads, err = _call(backward, do, *args, **kwargs)
                if not err and not isinstance(grads, dict):
                    err = f"backward returned {type(grads).__name__}, expected a dict"
                for key in GRAD_KEYS:
                    if err:
                        results.append(("d" + key, None, err))
                    elif key not in grads:
                        results.append(("d" + key, None, f"key {key!r} missing from the dict"))
                    else:
                        results.append(("d" + key, grads[key], ""))
            for tensor, got, err in results:
                tol = checked[tensor]["tol"][dt]
                if err:
                    report.rows.append(TensorResult(case["name"], dt, tensor, tol=tol, error=err))
                else:
                    report.rows.append(compare_tensor(got, arrays[tensor], tol,
                                                      case["name"], dt, tensor))
    return report


def _selected(name, cases):
    if cases is None:
        return True
    if isinstance(cases, str):
        return cases in name
    return name in cases


def format_report(report, failures_only=False):
    """The table: one row per case, dtype and tensor, then a summary."""
    head = (f"{'case':<42} {'dtype':<7} {'tensor':<14} {'max abs':>9} {'max rel':>9} "
            f"{'rms ratio':>10} {'err/scale':>9} {'tol':>9}  verdict")
    lines = [head, "-" * len(head)]
    for r in report.rows:
        if failures_only and r.ok:
            continue
        if r.error:
            lines.append(f"{r.case:<42} {r.dtype:<7} {r.tensor:<14} FAIL: {r.error}")
            continue
        lines.append(f"{r.case:<42} {r.dtype:<7} {r.tensor:<14} {r.max_abs:>9.2e} "
                     f"{r.max_rel:>9.2e} {r.rms_ratio:>10.6f} {r.err_scale:>9.2e} "
                     f"{r.tol:>9.2e}  {'ok' if r.ok else 'FAIL'}")
    lines.append("-" * len(head))
    failed = report.failures
    n_cases = len({r.case for r in report.rows})
    lines.append(f"{len(report.rows) - len(failed)} of {len(report.rows)} tensors passed "
                 f"over {n_cases} cases; {len(failed)} failed")
    if failed:
        worst = {}
        for r in failed:
            worst.setdefault(r.tensor, []).append(r.case + ("" if r.dtype == "float64" else
                                                            f" ({r.dtype})"))
        for tensor, names in worst.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"  FAILED {tensor}: {shown}")
    return "\n".join(lines)


def resolve(spec, what="--impl"):
    """The callable named by "package.module:function" or "path/to/file.py:function".

    The current directory is put on sys.path first, so a port's own package
    resolves as it does with `python -m`.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{what}: expected 'module:function' or 'file.py:function', got {spec!r}")
    module_name, attr = spec.split(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise ValueError(f"{what}: file {module_name!r} not found")
        name = "_gma_port_" + os.path.splitext(os.path.basename(module_name))[0]
        module_spec = importlib.util.spec_from_file_location(name, module_name)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"{what}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{what}: {module_name!r} has no callable {attr!r}")
    return fn
