"""The results of a sweep, read back from its run directories: a table in Markdown and CSV.

Nothing here comes from the Dask futures: every number is read from the runs' own
files, so the table is the same whoever (or whichever attempt) trained them.

Per job (jobs.csv):
    metric        the task's validation metric at the last step: the log's last
                  validation line (val_bpb for lm, val_accuracy, val_answer_accuracy)
    params        trained parameters of the checkpoint's model (gma_np.train.restore)
    ms_per_step   the median over the log's training lines of (elapsed time / steps)
                  between consecutive lines of one invocation with no validation between
                  them: the step itself, the occasional checkpoint included
    tokens_per_s  the median of the log's tokens_per_s (the trainer's own, per step)
    cpu_s         the worker process's CPU time over the job's attempts (attempts.jsonl):
                  its cost whatever the machine's load (the two columns above are wall
                  clock, and grow with the other processes' load); blank when an attempt
                  was killed (its time is not recorded)
    peak_rss_mib  peak resident memory of the worker during the job (done.json,
                  gma_np.sweep.runner: how it is measured), max over its attempts

Per row (results.csv, results.md): the jobs that differ only in the seed; the metric's
mean and sample standard deviation (ddof = 1; blank with one seed) over the finished
seeds, the other columns' mean over them (peak memory: the max), and the failures with
their reasons. Measured columns (time, tokens/s, memory) vary from run to run; the
rest (metric, params, steps, status) are a function of the configs alone
(`DETERMINISTIC_COLUMNS`).
"""

import csv
import io
import json
import math
import os
import platform
import statistics
import time

from gma_np.sweep.runner import (DONE_NAME, FAILED_NAME, attempts, checkpoint_step, job_state,
                                 read_json, scaling_state, scaling_units)

# The tasks' metrics as the log names them (a validation line may carry other keys too).
KNOWN_METRICS = ("val_bpb", "val_accuracy", "val_answer_accuracy")
# The metrics for which lower is better.
LOWER_IS_BETTER = ("val_bpb",)
# Columns of jobs.csv / results.csv that do not depend on timing.
DETERMINISTIC_COLUMNS = ("name", "group", "seed", "status", "reason", "metric_key", "metric",
                         "n_seeds", "n_done", "mean", "std", "params", "steps")
MIB = 2 ** 20


def read_log(run_dir):
    """The records of run_dir/log.jsonl (a torn last line skipped)."""
    out = []
    try:
        with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def metric_key_of(records):
    """The log's validation metric key: val_bpb, val_accuracy, ... (not val_loss)."""
    for known in KNOWN_METRICS:
        if any(known in r for r in records):
            return known
    for r in records:
        for k in r:
            if k.startswith("val_") and k != "val_loss":
                return k
    return None


def step_time_s(records):
    """Median seconds per step from the log (module docstring), or None."""
    per_step, prev = [], None
    for r in records:
        if "loss" in r:
            if prev is not None and r["elapsed_s"] > prev["elapsed_s"] and r["step"] > prev["step"]:
                per_step.append((r["elapsed_s"] - prev["elapsed_s"]) / (r["step"] - prev["step"]))
            prev = r
        elif any(k.startswith("val_") for k in r):
            prev = None                     # the interval holds a validation: not a step's time
    return statistics.median(per_step) if per_step else None


def curve(records, key):
    """[(step, value)] of the validation lines."""
    return [(r["step"], r[key]) for r in records if key in r]


def n_params(run_dir):
    """Trained parameters of the run's checkpoint (None without one)."""
    from gma_np.train import CheckpointError, restore
    try:
        return int(restore(run_dir)[1].n_params())
    except (CheckpointError, OSError, ValueError):
        return None


def job_row(job):
    """One job's numbers, read back from its run directory."""
    state, marker = job_state(job)
    records = read_log(job.run_dir)
    key = metric_key_of(records)
    steps = job.config["steps"]
    final = [r[key] for r in records if key and key in r and r["step"] == steps]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    t = step_time_s(records)
    done = read_json(os.path.join(job.run_dir, DONE_NAME)) or {}
    failed = read_json(os.path.join(job.run_dir, FAILED_NAME)) or {}
    peak = done.get("peak_rss_b") if state == "done" else None
    status = {"done": "done", "failed": "failed"}.get(state)
    if status is None:
        step = checkpoint_step(job.run_dir)
        status = "not started" if step is None else f"stopped at step {step}"
    return {"name": job.name, "group": group_label(job), "seed": job.seed,
            "status": status, "reason": failed.get("reason", "") if state == "failed" else "",
            "metric_key": key or "", "metric": final[-1] if final and state == "done" else None,
            "params": n_params(job.run_dir) if state == "done" else None, "steps": steps,
            "ms_per_step": None if t is None or state != "done" else 1e3 * t,
            "tokens_per_s": statistics.median(rates) if rates and state == "done" else None,
            "peak_rss_mib": None if peak is None else peak / MIB,
            "peak_scope": done.get("peak_scope", ""),
            "cpu_s": done.get("cpu_s") if state == "done" and _all_attempts_ended(job) else None,
            "attempts": done.get("attempts", failed.get("attempts")),
            "curve": curve(records, key) if key else [],
            "settings": dict(job.settings)}


def _all_attempts_ended(job):
    """Whether every attempt of the job recorded its end (a killed one's CPU time is lost)."""
    history = attempts(job.run_dir)
    return (sum(a.get("event") == "start" for a in history)
            == sum(a.get("event") == "end" for a in history))


def group_label(job):
    return ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in job.group)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def group_rows(job_rows, axes):
    """The table's rows: the jobs grouped by their settings without the seed, in grid order."""
    groups = {}
    for row in job_rows:
        key = tuple((a, row["settings"][a]) for a in axes if a != "seed")
        groups.setdefault(key, []).append(row)
    out = []
    for key, rows in groups.items():
        done = [r for r in rows if r["status"] == "done" and r["metric"] is not None]
        values = [r["metric"] for r in done]
        failed = [r for r in rows if r["status"] == "failed"]
        other = [r for r in rows if r["status"] not in ("done", "failed")]
        notes = [f"seed {r['seed']} failed: {r['reason']}" for r in failed]
        notes += [f"seed {r['seed']} {r['status']}" for r in other]
        peaks = [r["peak_rss_mib"] for r in done if r["peak_rss_mib"] is not None]
        params = sorted({r["params"] for r in done if r["params"] is not None})
        out.append({"settings": dict(key), "group": rows[0]["group"],
                    "metric_key": next((r["metric_key"] for r in rows if r["metric_key"]), ""),
                    "n_seeds": len(rows), "n_done": len(done),
                    "mean": statistics.fmean(values) if values else None,
                    "std": statistics.stdev(values) if len(values) >= 2 else None,
                    "params": params[0] if len(params) == 1 else (params or None),
                    "steps": rows[0]["steps"],
                    "ms_per_step": _mean([r["ms_per_step"] for r in done]),
                    "tokens_per_s": _mean([r["tokens_per_s"] for r in done]),
                    # blank unless every seed has it (runs of an older sweep do not)
                    "cpu_s": (_mean([r["cpu_s"] for r in done])
                              if all(r["cpu_s"] is not None for r in done) else None),
                    "peak_rss_mib": max(peaks) if peaks else None,
                    "peak_scope": ("worker" if any(r["peak_scope"] == "worker" for r in done)
                                   else "job"),
                    "status": "ok" if len(done) == len(rows) else "; ".join(notes),
                    "seeds": [r["seed"] for r in rows]})
    return out


def scaling_results(sweep):
    """{mixer: measurement dict} of the finished scaling measurements."""
    out = {}
    for unit in scaling_units(sweep):
        state, rec = scaling_state(unit)
        if state == "done":
            out[unit.mixer] = rec
    return out


def collect(sweep):
    """(job rows, table rows, scaling results) of a sweep, from its directories."""
    jobs = [job_row(j) for j in sweep.jobs]
    return jobs, group_rows(jobs, sweep.axes), scaling_results(sweep)


# ------------------------------------------------------------------ formatting

def _fmt(value, digits=4):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _metric_title(key):
    return {"val_bpb": "val bits/byte (lower is better)",
            "val_accuracy": "val accuracy (higher is better)",
            "val_answer_accuracy": "val answer accuracy (higher is better)"}.get(key, key)


def _axis_columns(axes, rows):
    """The swept fields other than the seed that vary among the rows (task, mixer always)."""
    cols = []
    for a in axes:
        if a == "seed":
            continue
        if a in ("task", "model.mixer") or len({r["settings"].get(a) for r in rows}) > 1:
            cols.append(a)
    return cols


def markdown_table(rows, axes):
    """The results table in Markdown, one table per task (each task its own metric)."""
    lines = []
    tasks = []
    for r in rows:
        if r["settings"].get("task") not in tasks:
            tasks.append(r["settings"].get("task"))
    for task in tasks:
        mine = [r for r in rows if r["settings"].get("task") == task]
        cols = [c for c in _axis_columns(axes, mine) if c != "task"]
        key = next((r["metric_key"] for r in mine if r["metric_key"]), "")
        names = [c.rpartition(".")[2] for c in cols]
        lines.append(f"**{task}** ({_metric_title(key)}, mean ± std over seeds)\n")
        lines.append("| " + " | ".join(names + ["seeds", "metric", "± std", "params", "steps",
                                                  "ms/step", "tokens/s", "CPU s", "peak MiB",
                                                  "status"]) + " |")
        lines.append("| " + " | ".join(["---"] * len(names) + ["---:"] * 9 + ["---"]) + " |")
        for r in mine:
            cells = [str(r["settings"].get(c)) for c in cols]
            cells += [f"{r['n_done']}/{r['n_seeds']}", _fmt(r["mean"]), _fmt(r["std"]),
                      f"{r['params']:,}" if isinstance(r["params"], int) else _fmt(r["params"]),
                      str(r["steps"]), _fmt(r["ms_per_step"], 1), _fmt(r["tokens_per_s"], 0),
                      _fmt(r["cpu_s"], 0),
                      _fmt(r["peak_rss_mib"], 0) + ("*" if r["peak_scope"] == "worker" else ""),
                      r["status"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if any(r["peak_scope"] == "worker" for r in rows):
        lines.append("\\* the worker's peak since it started (it could not be reset per job)\n")
    return "\n".join(lines)


TABLE_FIELDS = ("group", "metric_key", "n_seeds", "n_done", "mean", "std", "params", "steps",
                "ms_per_step", "tokens_per_s", "cpu_s", "peak_rss_mib", "status")
JOB_FIELDS = ("name", "group", "status", "reason", "metric_key", "metric", "params",
              "steps", "ms_per_step", "tokens_per_s", "cpu_s", "peak_rss_mib", "attempts")


def csv_text(rows, axes, kind="table"):
    """results.csv (kind "table", one line per row) or jobs.csv (kind "jobs", per job),
    full precision; the swept fields as columns."""
    buf = io.StringIO()
    fields = TABLE_FIELDS if kind == "table" else JOB_FIELDS
    cols = [a for a in axes if kind == "jobs" or a != "seed"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols + list(fields))
    for r in rows:
        w.writerow([r["settings"].get(a) for a in cols]
                   + ["" if r.get(f) is None else (repr(r[f]) if isinstance(r[f], float) else r[f])
                      for f in fields])
    return buf.getvalue()


def scaling_table(scaling, fit_from=0):
    """The scaling measurement in Markdown: time and memory per N, and the fitted slopes."""
    from gma_np.sweep.scaling import slopes
    if not scaling:
        return ""
    lengths = sorted({n for rec in scaling.values() for n in rec["lengths"]})
    head = (["mixer"] + [f"N={n} CPU ms" for n in lengths] + ["time slope"]
            + [f"N={lengths[-1]} MiB", "memory slope"])
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for mixer, rec in scaling.items():
        t = dict(zip(rec["lengths"], rec["cpu_s"]))
        m = dict(zip(rec["lengths"], rec["memory_b"]))
        s = slopes(rec, fit_from)
        lines.append("| " + " | ".join([mixer] + [_fmt(1e3 * t[n], 1) if n in t else ""
                                                  for n in lengths]
                                       + [_fmt(s["time"], 2),
                                          _fmt(m.get(lengths[-1], float("nan")) / MIB, 1),
                                          _fmt(s["memory"], 2)]) + " |")
    return "\n".join(lines) + "\n"


def where_gma_stands(rows):
    """Sentences comparing GMA with each other mixer at the same settings: who beats it on
    the metric, who is faster per step, who needs less memory."""
    out = []
    contexts = {}
    for r in rows:
        rest = tuple((k, v) for k, v in r["settings"].items() if k != "model.mixer")
        contexts.setdefault(rest, {})[r["settings"].get("model.mixer")] = r
    for rest, by_mixer in contexts.items():
        gma = by_mixer.get("gma")
        if gma is None or gma["mean"] is None or len(by_mixer) < 2:
            continue
        key = gma["metric_key"]
        lower = key in LOWER_IS_BETTER
        label = ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in rest)
        better = [(m, r) for m, r in by_mixer.items() if m != "gma" and r["mean"] is not None
                  and (r["mean"] < gma["mean"] if lower else r["mean"] > gma["mean"])]
        worse = [m for m, r in by_mixer.items() if m != "gma" and r["mean"] is not None
                 and (m, r) not in better]
        fmt = lambda r: _fmt(r["mean"]) + (f" ± {_fmt(r['std'])}" if r["std"] is not None else "")
        close = lambda m: " (within the spread)" if _within_spread(gma, by_mixer[m]) else ""
        if better:
            text = ", ".join(f"{m} {fmt(r)}{close(m)}" for m, r in sorted(
                better, key=lambda mr: mr[1]["mean"], reverse=not lower))
            out.append(f"- {label}: GMA ({fmt(gma)} {key}) is beaten by {text}"
                       + (f"; it beats {', '.join(m + close(m) for m in worse)}" if worse else "")
                       + ".")
        else:
            out.append(f"- {label}: GMA ({fmt(gma)} {key}) is best of {len(by_mixer)} mixers.")
        if gma["ms_per_step"] is not None:
            faster = [m for m, r in by_mixer.items() if m != "gma" and r["ms_per_step"] is not None
                      and r["ms_per_step"] < gma["ms_per_step"]]
            if faster:
                out.append(f"  Faster per step than GMA ({_fmt(gma['ms_per_step'], 1)} ms): "
                           + ", ".join(f"{m} ({_fmt(by_mixer[m]['ms_per_step'], 1)} ms)"
                                       for m in faster) + ".")
    return "\n".join(out)


# The sweep directory's record of every `gma-np compare` on it: a line when it starts,
# and one when it ends or is interrupted (Ctrl-C) with its wall time; a client killed
# outright leaves its start line alone.
INVOCATIONS = "invocations.jsonl"


def record_invocation(out, event, wall_s=None, **extra):
    """Append {"event", "time" (Unix), "wall_s", "load", ...} to out/invocations.jsonl."""
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load = None
    rec = {"event": event, "time": round(time.time(), 3), "load": load, **extra}
    if wall_s is not None:
        rec["wall_s"] = round(wall_s, 3)
    with open(os.path.join(out, INVOCATIONS), "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def invocation_summary(out):
    """A sentence on every invocation of the sweep in `out` (read after the current one
    recorded its end): how many, their wall time in all, how many were interrupted or
    killed; "" when there is no record."""
    try:
        with open(os.path.join(out, INVOCATIONS), encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return ""
    starts = sum(r.get("event") == "start" for r in recs)
    ends = [r for r in recs if r.get("event") in ("end", "interrupted")]
    if not starts:
        return ""
    wall = sum(r.get("wall_s", 0.0) for r in ends)
    interrupted = sum(r["event"] == "interrupted" for r in ends)
    killed = max(0, starts - len(ends))
    parts = [f"{starts} invocation{'s' if starts > 1 else ''} of the command on this sweep "
             f"directory, {wall / 60:.1f} min of wall time in all"]
    if interrupted:
        parts.append(f"{interrupted} interrupted (Ctrl-C)")
    if killed:
        parts.append(f"{killed} killed without a record (their time is not counted)")
    return "; ".join(parts)


def _within_spread(a, b):
    """True when two rows' means differ by less than the larger of their spreads over
    seeds: the comparison is not resolved by these seeds (one seed: no spread, False)."""
    spreads = [s for s in (a["std"], b["std"]) if s is not None]
    return bool(spreads) and abs(a["mean"] - b["mean"]) <= max(spreads)


def machine_description():
    """One line: cores, memory, Python, NumPy, Numba, Dask versions."""
    import numba
    import numpy
    cores = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024 / 2 ** 30
        mem_text = f"{mem:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        mem_text = "memory unknown"
    try:
        import distributed
        dask_text = f", Dask distributed {distributed.__version__}"
    except ImportError:
        dask_text = ""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = ", load average %.1f at the start" % os.getloadavg()[0]
    except (OSError, AttributeError):
        load = ""
    return (f"{cores} cores ({cpu}), {mem_text}, {platform.system()}, Python "
            f"{platform.python_version()}, NumPy {numpy.__version__}, Numba {numba.__version__}"
            f"{dask_text}{load}")


def write_results(sweep, collected=None, *, command="", machine="", wall_s=None, plots=()):
    """Write results.md, results.csv, jobs.csv (and scaling.csv) in the sweep directory,
    from `collected` (collect(sweep), read now if None); returns the results.md path."""
    jobs, rows, scaling = collect(sweep) if collected is None else collected
    fit_from = sweep.scaling.fit_from if sweep.scaling is not None else 0
    with open(os.path.join(sweep.out, "results.csv"), "w", encoding="utf-8") as f:
        f.write(csv_text(rows, sweep.axes, "table"))
    with open(os.path.join(sweep.out, "jobs.csv"), "w", encoding="utf-8") as f:
        f.write(csv_text(jobs, sweep.axes, "jobs"))
    if scaling:
        from gma_np.sweep.scaling import slopes
        with open(os.path.join(sweep.out, "scaling.csv"), "w", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["mixer", "N", "cpu_s", "time_s", "median_s", "memory_b", "time_slope",
                        "memory_slope"])
            for mixer, rec in scaling.items():
                s = slopes(rec, fit_from)
                medians = rec.get("median_s", rec["time_s"])
                for n, c, t, med, m in zip(rec["lengths"], rec["cpu_s"], rec["time_s"], medians,
                                           rec["memory_b"]):
                    w.writerow([mixer, n, repr(c), repr(t), repr(med), m, repr(s["time"]),
                                repr(s["memory"])])
    md = [f"# Results: {sweep.name}\n"]
    if command:
        md.append(f"Command: `{command}`\n")
    md.append(f"Machine: {machine or machine_description()}\n")
    if wall_s is not None:
        md.append(f"Wall time of this invocation: {wall_s / 60:.1f} min\n")
    history = invocation_summary(sweep.out)
    if history:
        md.append(f"History: {history}.\n")
    done = sum(r["status"] == "done" for r in jobs)
    md.append(f"{done} of {len(jobs)} runs finished.\n")
    md.append("## The table\n")
    md.append(markdown_table(rows, sweep.axes))
    stands = where_gma_stands(rows)
    if stands:
        md.append("## Where GMA stands\n")
        md.append(stands + "\n")
    if scaling:
        spec = sweep.scaling
        md.append("## Time and memory per step against N\n")
        md.append(f"One layer, forward + backward, B = {spec.batch_size}, model fields "
                  f"{json.dumps(spec.model)}, causal; time: the process's CPU time of the "
                  f"fastest of at least {spec.steps} steps (wall times in scaling.csv); memory: "
                  f"tracemalloc's peak of one step; slopes fitted on log-log axes over "
                  f"N >= {max(fit_from, spec.lengths[0])}.\n")
        md.append(scaling_table(scaling, fit_from))
    failures = [r for r in jobs if r["status"] == "failed"]
    if failures:
        md.append("## Failures\n")
        md.extend(f"- {r['name']}: {r['reason']}" for r in failures)
        md.append("")
    if plots:
        md.append("## Plots\n")
        for p in plots:
            title = os.path.splitext(os.path.basename(p))[0]
            md.append(f"![{title}]({os.path.relpath(p, sweep.out)})\n")
    path = os.path.join(sweep.out, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return path
