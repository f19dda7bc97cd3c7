"""The run's log: log.jsonl (one JSON object a line) and the loss-curve PNG.

Training lines are {"step", "loss" (nats), "lr", "grad_norm", "tokens_per_s",
"elapsed_s"}; validation lines are {"step", "val_bpb", "elapsed_s"} for the language
model and {"step", "val_<metric>", "val_loss" (nats), "elapsed_s"} for another task
(val_accuracy for listops, val_answer_accuracy for recall and copying). Read it
with `pandas.read_json(path, lines=True)` or a few lines of json.loads.

On resume the lines after the checkpoint's step are dropped (that stretch is
trained again), so the log always describes the run that the parameters come from.
"""

import json
import math
import os

from gma_np.train.checkpoint import atomic_write

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"


class RunLog:
    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOG_NAME)
        self.plot_path = os.path.join(run_dir, PLOT_NAME)

    def records(self):
        """Every record of the log, in order (a torn last line from a kill is skipped)."""
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def truncate_after(self, step):
        """Keep only the records of steps <= step (atomically)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda f: f.write(text.encode("utf-8")))

    def write(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, print_fn=print):
        """Write loss.png against the step: for the language model the training loss and the
        validation in bits per byte; for another task the training and validation loss in
        nats, and the validation metric on a second axis."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print_fn("plot: matplotlib is not installed (pip install 'gma_np[plot]'); skipping loss.png")
            return None
        recs = self.records()
        fig, ax = plt.subplots(figsize=(6, 4))
        metric = next((k for r in recs for k in r if k.startswith("val_") and k != "val_loss"), None)
        if metric in (None, "val_bpb"):
            train = [(r["step"], r["loss"] / math.log(2)) for r in recs if "loss" in r]
            val = [(r["step"], r["val_bpb"]) for r in recs if "val_bpb" in r]
            if train:
                ax.plot(*zip(*train), label="train (bits/byte)", lw=1)
            if val:
                ax.plot(*zip(*val), "o-", label="validation (bits/byte)")
            ax.set_ylabel("bits per byte")
            ax.legend()
        else:
            train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
            val_loss = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
            val = [(r["step"], r[metric]) for r in recs if metric in r]
            if train:
                ax.plot(*zip(*train), label="train loss", lw=1)
            if val_loss:
                ax.plot(*zip(*val_loss), "o-", label="validation loss")
            ax.set_ylabel("loss (nats)")
            right = ax.twinx()
            if val:
                right.plot(*zip(*val), "s-", color="C2", label=metric.replace("_", " "))
            right.set_ylabel(metric[4:].replace("_", " "))
            lines = ax.get_legend_handles_labels()
            more = right.get_legend_handles_labels()
            ax.legend(lines[0] + more[0], lines[1] + more[1])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path
