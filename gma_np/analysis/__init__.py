"""Look inside a trained GMA model: the statistics of docs/analysis.md and `gma-np analyze`.

    usage.py       routing mass per component, exp(entropy), token entropy, dead components
    alignment.py   NMI (scikit-learn's arithmetic normalisation) and purity, shuffled baseline
    categories.py  token categories: bytes (letter, vowel, digit, ...) and each task's tokens
    affinity.py    the N x N affinity of a window through the dense reference; effective rank
    stability.py   the Jacobian of r(x), its bounds, sensitivity to perturbations, temperature
    gradients.py   gradient norms reaching q and k against the responsibility entropy
    collect.py     run a model over rows of its task, collect q, k, r per layer and head; usage_summary
    report.py      every analysis of a sample, and the Markdown report
    figures.py     its PNG figures (matplotlib, the `plot` extra)
    commands.py    the `gma-np analyze` subcommand

The statistics are pure functions over arrays; only collect.py and commands.py know the model
and the run directory.
"""

from gma_np.analysis.collect import usage_summary

__all__ = ["usage_summary"]
