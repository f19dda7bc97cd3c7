"""The gma-np command: `check` prints the table and its exit status says whether all passed."""

import subprocess
import sys

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
    assert "causal-row-diag-mask-tau(H)" in out and "2 passed, 0 failed" in out


def test_check_exits_nonzero_on_failure(monkeypatch, capsys):
    row = selfcheck.CheckRow("bidir-row-diag-nomask-tau", gradcheck_ok=False, worst_input="v",
                             worst_rel_error=1e-4, reference_rel_error=1e-15, ok=False)
    monkeypatch.setattr(selfcheck, "check_matrix", lambda seed=0: [row])
    assert main(["check"]) == 1
    assert "0 passed, 1 failed" in capsys.readouterr().out


def test_console_entry_help():
    out = subprocess.run([sys.executable, "-m", "gma_np.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "check" in out.stdout
