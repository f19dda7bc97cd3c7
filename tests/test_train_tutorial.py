"""docs/tutorial.md runs as written: its Python blocks, in order, in one namespace.

The tutorial's own asserts (the hand-unrolled backward equals model_backward,
the gradient check passes, one AdamW step goes downhill) are the checks.
"""

import os
import re

TUTORIAL = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "tutorial.md")


def test_tutorial_runs_as_written(capsys):
    with open(TUTORIAL, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 8, "the tutorial lost its code blocks"
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/tutorial.md block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"^gradcheck \(random.*\): ok$", out, re.M), out[-2000:]
    assert out.rstrip().endswith("True"), "the AdamW step did not lower the loss"
