"""The mutation check of the test-suite: does the suite catch small, plausible bugs?

    python tests/mutation/run.py                 # every mutant of tests/mutation/mutants.py
    python tests/mutation/run.py --list          # the list: name, file, kind
    python tests/mutation/run.py --only NAME     # one mutant (or several, comma-separated)
    python tests/mutation/run.py --rev HEAD      # the committed tree instead of the work tree

Each mutant (tests/mutation/mutants.py) replaces exact snippets of one source file.
For each, in a temporary copy of the repository (the files `git ls-files` lists, with
their modification times):

1. apply the mutant (a snippet that is not found exactly once is an error: the code
   moved and the list must follow it);
2. delete the Numba cache of the mutated file (and of any file whose kernels import
   it), so that a mutated kernel is compiled from the mutated source, never loaded
   from the unmutated run's cache; every other kernel loads from the cache that the
   baseline run left in the pristine copy (Numba's in-tree cache, __pycache__, keyed
   by the source file's modification time and size);
3. run the mutant's own test files first (`tests`: a quick kill), then, if they all
   pass, the whole default suite, `python -m pytest -q -x`, with PYTHONPATH at the
   copy (the installed package must not shadow it: checked before the baseline).

A mutant is killed when a test fails (or the run errors or times out), survived when
the whole suite passes. The first failing test and the time are printed for each;
the exit status is 1 if any mutant survived. The unmutated suite runs once first (the
baseline: it must pass, and it warms the copy's Numba cache).

Why not mutmut or cosmic-ray: they generate mutants by operator (thousands here, most
of them equivalent or trivially caught), run the suite per mutant in the source tree
or a copy they manage, and know nothing of Numba's cache: a mutated kernel can be
loaded stale from it, or every kernel recompiled per mutant (minutes each). A curated
list of bugs a reviewer would worry about, a warm cache invalidated per mutated file,
and a targeted first run keep the check to about a minute per mutant (docs/testing.md).
"""

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mutants import MUTANTS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
# tests/test_mutation_list.py holds this list to the unmutated sources: in a mutated copy it
# fails by construction (the snippet is gone), so these runs leave it out
PYTEST = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
          "--ignore=tests/test_mutation_list.py"]
# a mutant that makes the suite this many times slower than the baseline (plus a margin)
# is counted as killed: a hang is a failure a user would see
TIMEOUT_FACTOR = 3.0
TIMEOUT_MARGIN_S = 180.0
EXTRA_ARGS = []                                   # --pytest-args, for every run


class MutantError(RuntimeError):
    """A mutant that cannot be applied: its snippet is not in the file exactly once."""


def tracked_files(rev):
    out = subprocess.run(["git", "ls-files", "-z"] if rev is None else
                         ["git", "ls-tree", "-r", "-z", "--name-only", rev],
                         cwd=REPO, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def make_pristine(dest, rev):
    """The repository's tracked files in dest: from the work tree (modification times kept)
    or from commit rev."""
    os.makedirs(dest)
    if rev is None:
        for path in tracked_files(None):
            src = os.path.join(REPO, path)
            if not os.path.isfile(src):           # deleted in the work tree, not yet committed
                continue
            os.makedirs(os.path.dirname(os.path.join(dest, path)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, path))
    else:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def environment(copy, task_cache):
    env = dict(os.environ)
    env["PYTHONPATH"] = copy
    env.pop("NUMBA_CACHE_DIR", None)              # the in-tree cache of the copy, see step 2
    env.pop("NUMBA_DISABLE_JIT", None)
    env["GMA_NP_CACHE"] = task_cache              # generated task data: not the user's cache
    env["CI"] = "1"                               # derandomized property tests: same verdicts
    return env


def check_import(copy, env):
    """The copy's gma_np is the one imported (not the editable install of the work tree)."""
    got = subprocess.run([sys.executable, "-c", "import gma_np; print(gma_np.__file__)"],
                         cwd=copy, env=env, capture_output=True, text=True)
    path = got.stdout.strip()
    if got.returncode != 0 or not os.path.realpath(path).startswith(os.path.realpath(copy) + os.sep):
        sys.exit(f"mutation: the copy's gma_np is not the one imported (got {path!r}, "
                 f"{got.stderr.strip()[-300:]!r}); is PYTHONPATH overridden by the installation?")
    return path


def apply(mutant, copy):
    path = os.path.join(copy, mutant.file)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            raise MutantError(f"{mutant.name}: the snippet {old.strip()[:60]!r} occurs {count} times "
                              f"in {mutant.file} (expected once): update tests/mutation/mutants.py")
        text = text.replace(old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _module(path):
    return path[:-3].replace("/", ".").removesuffix(".__init__")


def stale_kernel_sources(mutant, copy, files):
    """The mutated file and, if it defines Numba kernels, every file with kernels that imports
    it (Numba's cache of a caller does not follow a callee in another file)."""
    out = [mutant.file]
    with open(os.path.join(copy, mutant.file), encoding="utf-8") as f:
        if "@njit" not in f.read():
            return out
    module = _module(mutant.file)
    for path in files:
        if path.endswith(".py") and path != mutant.file:
            with open(os.path.join(copy, path), encoding="utf-8") as f:
                text = f.read()
            if "@njit" in text and re.search(rf"\bfrom {re.escape(module)} import|\bimport {re.escape(module)}\b", text):
                out.append(path)
    return out


def _cache_files(copy, source):
    d = os.path.join(copy, os.path.dirname(source), "__pycache__")
    stem = os.path.basename(source)[:-3] + "."
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, n) for n in os.listdir(d)
            if n.startswith(stem) and n.endswith((".nbi", ".nbc"))]


def first_failure(output):
    """The first failing test of a pytest run ("FAILED x::y - why" or "ERROR x" of the short
    test summary; captured log lines also start with ERROR), else a tail line."""
    lines = output.splitlines()
    summary = [i for i, ln in enumerate(lines) if "short test summary info" in ln]
    for line in lines[summary[-1] + 1:] if summary else lines:
        if line.startswith(("FAILED ", "ERROR ")) and (summary or "::" in line):
            return line.split(" ", 1)[1][:160]
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return (lines[-1] if lines else "(no output)")[:160]


def run_pytest(args, copy, env, timeout, log):
    start = time.perf_counter()
    try:
        proc = subprocess.run(PYTEST + EXTRA_ARGS + args, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output, code = output + f"\n(timeout after {timeout:.0f} s)", "timeout"
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ pytest {' '.join(args)}  -> {code}\n{output}\n")
    return code, output, time.perf_counter() - start


def run_mutant(mutant, pristine, work, files, env_of, timeout, full_only, quick):
    """(status, first failing test, seconds, note) of one mutant in its own copy."""
    start = time.perf_counter()
    copy = os.path.join(work, mutant.name, "repo")
    shutil.rmtree(os.path.dirname(copy), ignore_errors=True)
    shutil.copytree(pristine, copy, symlinks=True)
    log = os.path.join(work, mutant.name, "pytest.log")
    apply(mutant, copy)
    stale = stale_kernel_sources(mutant, copy, files)
    for source in stale:
        for path in _cache_files(copy, source):
            os.unlink(path)
    env = env_of(copy)
    phases = [] if full_only else [[t for t in mutant.tests]]
    if not quick:
        phases.append([])                                 # the whole default suite
    status, failing = "not killed (own tests only)" if quick else "survived", ""
    for args in phases:
        code, output, _ = run_pytest(args, copy, env, timeout, log)
        if code == 0:
            continue
        if code == "timeout":
            status = "killed (timeout)"         # a hang is a failure a user would see
        elif isinstance(code, int) and code < 0:
            status = "killed (crash)"           # so is a segmentation fault (signal -code)
        else:
            status = "killed" if code in (1, 2) else f"error (pytest exit {code})"
        failing = first_failure(output)
        break
    note = ""
    if "@njit" in open(os.path.join(copy, mutant.file), encoding="utf-8").read():
        compiled = len([p for p in _cache_files(copy, mutant.file) if p.endswith(".nbi")])
        note = f"{compiled} kernel index(es) of {os.path.basename(mutant.file)} rebuilt"
    if not os.environ.get("MUTATION_KEEP"):
        shutil.rmtree(copy, ignore_errors=True)          # keep the log only
    return status, failing, time.perf_counter() - start, note


def check_mutants(selected, pristine, scratch, need_tests=True):
    """Exit with a message unless every mutant applies and (need_tests) names test files
    that exist."""
    for m in selected:
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.join(scratch, m.file)), exist_ok=True)
        shutil.copy2(os.path.join(pristine, m.file), os.path.join(scratch, m.file))
        try:
            apply(m, scratch)
        except MutantError as err:
            sys.exit(f"mutation: {err}")
        for t in m.tests if need_tests else ():
            if not os.path.exists(os.path.join(pristine, t.split("::")[0])):
                sys.exit(f"mutation: {m.name}: no test file {t}")
    shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--check", action="store_true",
                        help="check that every selected mutant applies, then exit")
    parser.add_argument("--only", help="run only these mutants (comma-separated names)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--rev", help="take the files of this commit (default: the work tree)")
    parser.add_argument("--full", action="store_true",
                        help="skip each mutant's own tests: run the whole suite only")
    parser.add_argument("--quick", action="store_true",
                        help="run each mutant's own tests only (a screen while writing tests: "
                             "no verdict for those they do not kill)")
    parser.add_argument("--pytest-args", default="",
                        help="extra pytest arguments for every run, after an =: "
                             "--pytest-args=--ignore=tests/test_sweep.py")
    parser.add_argument("--workdir", help="where the copies go (default: a new temporary directory)")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        sys.exit("mutation: two mutants share a name")
    selected = MUTANTS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            sys.exit(f"mutation: no mutant named {unknown} (--list shows them)")
        selected = [m for m in MUTANTS if m.name in wanted]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<34} {m.kind:<26} {m.file}")
            print(f"{'':<34} {m.why}")
        print(f"{len(MUTANTS)} mutants")
        return 0
    EXTRA_ARGS[:] = args.pytest_args.split()
    if args.jobs < 1:
        sys.exit("mutation: --jobs expects an integer >= 1")

    work = args.workdir or tempfile.mkdtemp(prefix="gma-mutation-")
    os.makedirs(work, exist_ok=True)
    pristine = os.path.join(work, "pristine")
    shutil.rmtree(pristine, ignore_errors=True)
    make_pristine(pristine, args.rev)
    files = tracked_files(args.rev)
    task_cache = os.path.join(work, "task-cache")
    env_of = lambda copy: environment(copy, task_cache)   # noqa: E731
    check_mutants(selected, pristine, os.path.join(work, "apply-check"), need_tests=not args.full)
    if args.check:
        print(f"{len(selected)} mutants apply to {args.rev or 'the work tree'}")
        shutil.rmtree(work, ignore_errors=True)
        return 0

    print(f"mutation check: {len(selected)} mutants, copies in {work}", flush=True)
    print(f"imports {check_import(pristine, env_of(pristine))}", flush=True)
    # the quick screen needs no baseline verdict, only the warm cache of the files it runs
    baseline_tests = sorted({t for m in selected for t in m.tests}) if args.quick else []
    code, output, baseline = run_pytest(baseline_tests, pristine, env_of(pristine), None,
                                        os.path.join(work, "baseline.log"))
    if code != 0:
        sys.exit(f"mutation: the unmutated suite fails ({first_failure(output)}); "
                 f"fix it first (log: {os.path.join(work, 'baseline.log')})")
    summary = [ln for ln in output.splitlines() if " passed" in ln]
    print(f"baseline: {summary[-1].strip('= ') if summary else 'passed'} in {baseline:.0f} s", flush=True)
    timeout = TIMEOUT_FACTOR * baseline + TIMEOUT_MARGIN_S

    lock = threading.Lock()
    results = {}
    t0 = time.perf_counter()

    def one(m):
        status, failing, seconds, note = run_mutant(m, pristine, work, files, env_of, timeout,
                                                    args.full, args.quick)
        with lock:
            results[m.name] = (status, failing, seconds)
            print(f"{status:<16} {m.name:<34} {seconds:6.0f} s  {failing}"
                  + (f"  [{note}]" if note else ""), flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one, m) for m in selected]:
            future.result()
    total = time.perf_counter() - t0
    killed = [n for n, r in results.items() if r[0].startswith("killed")]
    survived = [n for n, r in results.items() if r[0] == "survived" or r[0].startswith("not killed")]
    errors = [n for n, r in results.items() if r[0].startswith("error")]
    kinds = sorted({m.kind for m in selected})
    print(f"\n{len(killed)} killed, {len(survived)} {'not killed' if args.quick else 'survived'}, {len(errors)} errors of {len(selected)} "
          f"mutants in {total / 60:.1f} min (baseline {baseline:.0f} s); kinds: {', '.join(kinds)}")
    if survived:
        print("survived: " + ", ".join(survived))
    print(f"logs: {work}/<mutant>/pytest.log")
    return 1 if survived or errors else 0


if __name__ == "__main__":
    sys.exit(main())
