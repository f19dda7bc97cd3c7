"""The mutation check's list (tests/mutation/mutants.py; docs/testing.md) against the code
it mutates: every snippet of every mutant occurs exactly once in its file, and every test
file a mutant names exists. The check itself takes minutes and runs by hand; this keeps
its list from going stale silently when code moves (as two snippets once did). The
check's own runs leave this file out (tests/mutation/run.py, PYTEST): in a mutated copy
it would fail by construction and so kill every mutant."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "mutation"))
from mutants import MUTANTS  # noqa: E402  (tests/mutation is not a package)


def test_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_every_mutant_applies_and_names_existing_tests(mutant):
    with open(os.path.join(REPO, mutant.file), encoding="utf-8") as f:
        text = f.read()
    for old, new in mutant.edits:
        assert text.count(old) == 1, (f"{mutant.name}: its snippet {old.strip()[:60]!r} "
                                      f"is not in {mutant.file} once")
        assert new != old
        text = text.replace(old, new)
    for test in mutant.tests:
        assert os.path.exists(os.path.join(REPO, test.split("::")[0])), f"{mutant.name}: no {test}"
