"""The gma-np command: `check` prints the table and its exit status says whether all passed."""

import json
import os
import subprocess
import sys

import pytest

import gma_np.selfcheck as selfcheck
from gma_np.cli import main


def test_check_prints_table_and_exits_zero(monkeypatch, capsys):
    # two configurations stand in for the full matrix (tests/test_mixing.py runs all 32)
    rows = [selfcheck.check_configuration(True, "row", "diag", True, True,
                                          sizes=dict(B=1, H=1, N=4, d=2, e=2, K=2)),
            selfcheck.check_configuration(False, "slot", "spherical", False, False,
                                          sizes=dict(B=1, H=1, N=4, d=2, e=2, K=2))]
    monkeypatch.setattr(selfcheck, "check_matrix", lambda seed=0: rows)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "causal-row-diag-mask-tauH" in out and "2 passed, 0 failed" in out


def test_check_exits_nonzero_on_failure(monkeypatch, capsys):
    row = selfcheck.CheckRow("bidir-row-diag-nomask-tau", gradcheck_ok=False, worst_input="v",
                             worst_rel_error=1e-4, reference_rel_error=1e-15, ok=False)
    monkeypatch.setattr(selfcheck, "check_matrix", lambda seed=0: [row])
    assert main(["check"]) == 1
    assert "0 passed, 1 failed" in capsys.readouterr().out


def test_console_entry_help():
    out = subprocess.run([sys.executable, "-m", "gma_np.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "check" in out.stdout


# ---------------------------------------------------------------- --version, python -m gma_np

def test_version_and_python_dash_m():
    import gma_np
    out = subprocess.run([sys.executable, "-m", "gma_np", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and gma_np.__version__ in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "gma_np", "check", "--seed", "-5"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "gma-np check: error: argument --seed: expected an integer >= 0, got '-5' "
        "(see gma-np check --help)"]


# ---------------------------------------------------------------- bad input: one line, exit 2 or 1

def _cli(args, capsys):
    """(exit status, stdout, stderr) of `gma-np args`, in process."""
    try:
        status = main(args)
    except SystemExit as exc:          # argparse exits on a usage error
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_one_line(err, *names):
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert "Traceback" not in err and lines[0].startswith("gma-np ") and ": error: " in lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


@pytest.mark.parametrize("args, named", [
    (["check", "--seed", "-5"], "--seed"),
    (["check", "--seed", "x"], "--seed"),
    (["vectors", "export", "{tmp}/bundle", "--seed", "-1"], "--seed"),
    (["vectors", "check", "{tmp}", "--impl", "no_colon"], "--impl"),
    (["vectors", "check", "{tmp}"], "--impl"),
    (["sample", "{tmp}", "--tokens", "-3"], "--tokens"),
    (["sample", "{tmp}", "--temperature", "-1"], "--temperature"),
    (["sample", "{tmp}", "--top-k", "-2"], "--top-k"),
    (["sample", "{tmp}", "--seed", "-1"], "--seed"),
    (["eval", "{tmp}", "--tokens", "-5"], "--tokens"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--steps", "-3"], "--steps"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--warmup-steps", "-1"], "--warmup-steps"),
    (["train", "--eval-interval", "0"], "--eval-interval"),
    (["train", "--checkpoint-interval", "0"], "--checkpoint-interval"),
    (["train", "--stop-after", "0"], "--stop-after"),
    (["train", "--preset", "huge"], "--preset"),
])
def test_usage_errors_are_one_line_and_exit_two(args, named, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    status, out, err = _cli(args, capsys)
    assert status == 2
    _assert_one_line(err, named)
    assert not (tmp_path / "bundle").exists(), "a refused command wrote something"


def _manifest(directory):
    """A bundle manifest with one case and no files: enough for --case to select from."""
    from gma_np.vectors import FORMAT_NAME, FORMAT_VERSION
    directory.mkdir()
    (directory / "manifest.json").write_text(json.dumps(
        {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
         "cases": [{"name": "well-bidir-row-diag-nomask-tau"}], "files": {}}))
    return directory


def test_failures_are_one_line_and_exit_one(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    bundle = str(_manifest(tmp_path / "bundle"))
    cases = [
        (["vectors", "check", bundle, "--impl", "gma_np:gma", "--case", "no-such-case"],
         ["--case", "no-such-case"]),
        (["vectors", "check", bundle, "--impl", "no_such_module:gma"], ["--impl", "no_such_module"]),
        (["vectors", "check", str(tmp_path / "none"), "--impl", "gma_np:gma"], ["manifest.json"]),
        (["vectors", "export", str(a_file), "--quick"], ["a_file", "existing file"]),
        (["vectors", "export", str(a_file / "sub"), "--quick"], ["cannot create"]),
        (["train", "--preset", "test", "--out", str(a_file)], ["--out", "existing file"]),
        (["train", "--preset", "test", "--out", str(a_file / "run")], ["--out", "cannot create"]),
        (["train", "--resume", "--out", str(tmp_path / "no_run")], ["no checkpoint.npz"]),
        (["train", "--resume", "--steps", "40", "--out", str(tmp_path / "no_run")],
         ["no checkpoint.npz"]),
        (["eval", str(tmp_path / "no_run")], ["no checkpoint.npz"]),
        (["sample", str(tmp_path / "no_run")], ["no checkpoint.npz"]),
        (["train", "--preset", "test", "--out", str(tmp_path / "r"), "--data",
          str(tmp_path / "missing.txt")], ["data", "not found"]),
        (["train", "--config", str(tmp_path / "missing.json")], ["--config", "cannot read"]),
    ]
    for args, names in cases:
        status, _, err = _cli(args, capsys)
        assert status == 1, args
        _assert_one_line(err, *names)
    assert not (tmp_path / "no_run").exists(), "a failed resume created the run directory"
    assert not (tmp_path / "r").exists() or not os.listdir(tmp_path / "r")


def test_unreadable_data_and_bad_config_files(tmp_path, capsys, monkeypatch):
    import gma_np.data.corpus as data_module
    text = tmp_path / "corpus.txt"
    text.write_text("some text\n" * 100)

    def no_permission(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)
    # as root a chmod 000 file stays readable, so the read itself is made to fail
    monkeypatch.setattr(data_module, "open", no_permission, raising=False)
    status, _, err = _cli(["train", "--preset", "test", "--out", str(tmp_path / "r"),
                           "--data", str(text)], capsys)
    assert status == 1
    _assert_one_line(err, "data", "cannot read", "corpus.txt", "Permission denied")
    monkeypatch.undo()
    for name, content, names in [
            ("unknown.json", {"stpes": 3, "model": {"d_modle": 8}},
             ["'stpes' (did you mean 'steps'?)", "'model.d_modle' (did you mean 'model.d_model'?)"]),
            ("type.json", {"steps": "ten"}, ["steps", "expected int", "'ten'"]),
            ("value.json", {"model": {"n_heads": 0}}, ["model.n_heads", "positive integer"]),
            ("list.json", [1, 2], ["--config", "JSON list"]),
            ("broken.json", None, ["--config", "not valid JSON"])]:
        path = tmp_path / name
        path.write_text("{" if content is None else json.dumps(content))
        status, _, err = _cli(["train", "--config", str(path), "--out", str(tmp_path / "c")], capsys)
        assert status == 1, name
        _assert_one_line(err, *names)


def test_steps_inside_the_warmup_warns(tmp_path, capsys):
    status, _, err = _cli(["train", "--preset", "test", "--steps", "3", "--out",
                           str(tmp_path / "run")], capsys)
    assert status == 0
    assert err.strip().splitlines() == [line for line in err.strip().splitlines()
                                        if line.startswith("gma-np train: warning: ")]
    assert "steps 3 ends inside the warm-up of 5 steps" in err
    status, _, err = _cli(["train", "--preset", "test", "--steps", "6", "--out",
                           str(tmp_path / "run2")], capsys)
    assert status == 0 and "warning" not in err


def test_help_gives_each_default_once(capsys):
    import re
    for command in (["--help"], ["check", "--help"], ["train", "--help"], ["eval", "--help"],
                    ["sample", "--help"], ["vectors", "export", "--help"],
                    ["vectors", "check", "--help"]):
        status, out, _ = _cli(command, capsys)
        assert status == 0
        # one option's help runs from its flag to the next flag at the start of a line
        for block in re.split(r"\n  (?=-)", out):
            assert block.count("default") <= 1, f"{command}: {block!r}"
