"""What `gma-np vectors export` and `gma-np vectors check` do, behind the thin CLI.

Exit status of check: 0 when every tensor passes, 1 when one fails, and 1 with
one line on stderr when the check cannot run: the bundle is damaged (a checksum
fails: the message names the file), the port cannot be imported, or --case
selects no case. (2 is left to the parser's usage errors, as in every subcommand.)
"""

import os
import sys
import time

from gma_np.cli import fail, output_directory
from gma_np.vectors.check import BundleError, check_port, read_manifest, resolve


def export_command(directory, quick=False, seed=0, out=None):
    """Write the bundle and print what was written: cases, size, time. Returns 0.
    CommandError (gma_np.cli) if `directory` is a file or cannot be created."""
    out = sys.stdout if out is None else out
    from gma_np.vectors.export import export_bundle
    output_directory(directory, "directory")       # before the cases are computed
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
    """Check a port against the bundle, print the table, return the exit status.
    Errors that stop the check are one line on stderr."""
    out = sys.stdout if out is None else out
    command = "vectors check"
    try:
        forward = resolve(impl, "--impl")
        backward = resolve(backward, "--backward") if backward else None
        responsibilities = (resolve(responsibilities, "--responsibilities")
                            if responsibilities else None)
    except ValueError as exc:          # resolve's own message: the spec, the file or the import
        return fail(command, exc)
    try:
        if cases is not None:
            names = [c["name"] for c in read_manifest(directory)["cases"]]
            if not any(cases in name for name in names):
                example = f" (such as {names[0]!r})" if names else ""
                return fail(command, f"--case: {cases!r} is in none of the {len(names)} case "
                                     f"names of {directory}{example}")
        dtypes = ("float64", "float32") if dtype == "both" else (dtype,)
        report = check_port(directory, forward, backward, responsibilities, dtypes, cases)
    except BundleError as exc:
        return fail(command, exc)
    print(report.format(failures_only=failures_only), file=out)
    if backward is None:
        print("(no --backward given: gradients not checked)", file=out)
    return 0 if report.ok else 1
