"""What `gma-np vectors export` and `gma-np vectors check` do, behind the thin CLI.

Exit status of check: 0 when every tensor passes, 1 when one fails, 2 when the
bundle is damaged (a checksum fails: the message names the file) or the port
cannot be imported.
"""

import os
import sys
import time

from gma_np.vectors.check import BundleError, check_port, resolve


def export_command(directory, quick=False, seed=0, out=None):
    """Write the bundle and print what was written: cases, size, time. Returns 0."""
    out = sys.stdout if out is None else out
    from gma_np.vectors.export import export_bundle
    start = time.perf_counter()
    manifest = export_bundle(directory, "quick" if quick else "default", seed)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(directory, name))
               for name in list(manifest["files"]) + ["manifest.json"])
    print(f"wrote {len(manifest['cases'])} cases ({manifest['matrix']} matrix, seed {seed}) "
          f"to {directory}: {size / 1e6:.2f} MB in {seconds:.1f} s", file=out)
    return 0


def check_command(directory, impl, backward=None, responsibilities=None, dtype="float64",
                  cases=None, failures_only=False, out=None):
    """Check a port against the bundle, print the table, return the exit status."""
    out = sys.stdout if out is None else out
    try:
        forward = resolve(impl, "--impl")
        backward = resolve(backward, "--backward") if backward else None
        responsibilities = (resolve(responsibilities, "--responsibilities")
                            if responsibilities else None)
    except ValueError as exc:
        print(f"gma-np vectors check: {exc}", file=out)
        return 2
    dtypes = ("float64", "float32") if dtype == "both" else (dtype,)
    try:
        report = check_port(directory, forward, backward, responsibilities, dtypes, cases)
    except BundleError as exc:
        print(f"gma-np vectors check: {exc}", file=out)
        return 2
    print(report.format(failures_only=failures_only), file=out)
    if backward is None:
        print("(no --backward given: gradients not checked)", file=out)
    return 0 if report.ok else 1
