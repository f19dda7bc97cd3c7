"""Running a sweep: one Dask task per run directory, nothing lost and nothing done twice.

    outcome = run_sweep(sweep, client)         # client: gma_np.sweep.cluster.open_client

Every unit of work is a job of the grid (a training run in <out>/runs/<name>) or a
mixer's scaling measurement (<out>/scaling/<mixer>.json). A job's run directory holds
the trainer's files (checkpoint.npz, checkpoint.json, config.json, log.jsonl) and the
sweep's own:

    done.json       written atomically when the run has reached its last step: the
                    config, the step, the metric, peak memory, attempts. A job with a
                    done.json of its config and a checkpoint at its last step is
                    finished: it is skipped, never trained again.
    failed.json     the reason of a failure raised by the job itself (TrainingDiverged,
                    a ConfigError, any exception): a failed job is reported in the table
                    and not re-run by the same command (it would fail the same way);
                    `--retry-failed` runs it again.
    attempts.jsonl  one line per attempt (start, and the end when it got there): host,
                    process, the step it started from, peak memory, wall and CPU time
                    (the worker process's, time.process_time: what the job cost,
                    whatever else the machine was doing).
    job.lock        held while an attempt trains the run: a second attempt of the same
                    job (Dask running a task again after losing contact with a worker)
                    reports "busy" instead of writing into the same run. A lock whose
                    process is gone (on this host) or whose heartbeat (one touch per
                    step) is older than LOCK_STALE_S is taken over.
    train.out       what the trainer printed.

An unfinished job (no done.json) resumes from its checkpoint: train(cfg, run_dir,
resume=True), which is exact, bit for bit (gma_np.train.loop). So Ctrl-C, a killed
client, a killed worker (Dask runs its task again on another worker) or a killed
machine, followed by the same command, trains each run to the same parameters and
the same log as an uninterrupted sweep, and the table made from the run directories
is the same (its measured columns, time and memory, are measurements: they differ
from run to run anyway).

Peak memory of a job is the peak resident set size of the worker process during the
job: on Linux the process's high-water mark is reset when the job starts (writing 5
to /proc/self/clear_refs) and read at its end (getrusage's ru_maxrss, which then
reads the reset mark). Resident memory, not tracemalloc: it counts everything the
job holds (NumPy's arrays, Numba's, the interpreter and the task's data) and costs
nothing per allocation, where tracemalloc would slow the training loop that the
time-per-step column measures. It includes the worker's own baseline (the interpreter,
NumPy, Numba, Dask: ~150-250 MB). Where the mark cannot be reset (not Linux), it is
the worker's peak since it started, an upper bound, and the table says so.
"""

import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field

DONE_NAME = "done.json"
FAILED_NAME = "failed.json"
ATTEMPTS_NAME = "attempts.jsonl"
LOCK_NAME = "job.lock"
OUT_NAME = "train.out"
SWEEP_NAME = "sweep.json"
SCALING_DIR = "scaling"
# A lock untouched this long belongs to an attempt that is gone (a worker on another
# host, whose process cannot be looked up from here): it is taken over. A training step
# touches it, and the longest wait between touches is a job's start (building the task:
# ListOps generates its splits in ~25 s; Numba loads or compiles its kernels) or an
# evaluation: minutes at most on the presets.
LOCK_STALE_S = 900


class JobBusy(RuntimeError):
    """Another live attempt holds the job's lock."""


# ------------------------------------------------------------------ files

def atomic_write_json(path, obj):
    """Write obj as JSON to path through a temporary file, fsync'ed and renamed over it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path):
    """The JSON object in path, or None if it is missing or unreadable (a torn write)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _same(a, b):
    """Two configs equal as JSON (tuples and lists alike)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def checkpoint_step(run_dir):
    """The step of run_dir's last checkpoint (its checkpoint.json), or None."""
    meta = read_json(os.path.join(run_dir, "checkpoint.json"))
    return None if meta is None else meta.get("step")


def job_state(job):
    """("done" | "failed" | "todo", the marker's record or None) of a job's run directory."""
    done = read_json(os.path.join(job.run_dir, DONE_NAME))
    if (done is not None and _same(done.get("config"), job.config)
            and checkpoint_step(job.run_dir) == job.config["steps"]):
        return "done", done
    failed = read_json(os.path.join(job.run_dir, FAILED_NAME))
    if failed is not None and _same(failed.get("config"), job.config):
        return "failed", failed
    return "todo", None


def attempts(run_dir):
    """The attempt records of a run directory, in order."""
    out = []
    try:
        with open(os.path.join(run_dir, ATTEMPTS_NAME), encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:           # a line torn by a kill
                    continue
    except OSError:
        pass
    return out


def _append_attempt(run_dir, record):
    with open(os.path.join(run_dir, ATTEMPTS_NAME), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# ------------------------------------------------------------------ memory

def reset_peak_memory():
    """Reset the process's peak resident set size; "job" if it could be, else "worker"."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "job"
    except OSError:
        return "worker"


def peak_memory_bytes():
    """The process's peak resident set size in bytes (getrusage's ru_maxrss)."""
    try:
        import resource
    except ImportError:                      # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)   # bytes on macOS, KiB elsewhere


# ------------------------------------------------------------------ the lock

def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # alive, someone else's
        return True
    return True


class JobLock:
    """The job.lock of a run directory (module docstring), as a context manager."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}

    def _stale(self):
        other = read_json(self.path)
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return True
        if age > LOCK_STALE_S:
            return True
        if other is None:                    # being written this very moment, or torn
            return age > 5
        return other.get("host") == self.me["host"] and not _process_alive(other.get("pid", -1))

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if self._stale():
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                other = read_json(self.path) or {}
                raise JobBusy(f"another attempt (process {other.get('pid')} on "
                              f"{other.get('host')}) is training this run") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return self
        raise JobBusy(f"could not take {self.path}")

    def touch(self):
        try:
            os.utime(self.path)
        except OSError:
            pass

    def __exit__(self, *exc):
        if (read_json(self.path) or {}).get("token") == self.me["token"]:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        return False


# ------------------------------------------------------------------ on a worker

def _reason(err):
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# The fields a resume may change that the sweep holds fixed: the trainer would extend or
# shorten the run to a new `steps` (keeping the old schedule), which is not the run the
# grid asks for. Every other field the trainer checks itself on resume.
SCHEDULE_FIELDS = ("steps", "decay_steps")


def _incompatible(job):
    """A reason if the run directory's checkpoint has another step budget than the job's."""
    meta = read_json(os.path.join(job.run_dir, "checkpoint.json"))
    if meta is None:
        return None
    theirs = meta.get("config", {})
    differ = [f"{k}: existing {theirs.get(k)!r}, the grid's {job.config.get(k)!r}"
              for k in SCHEDULE_FIELDS if theirs.get(k) != job.config.get(k)]
    if not differ:
        return None
    return (f"{job.run_dir} holds a run of another length ({'; '.join(differ)}): remove it, "
            f"or give the sweep another --out")


def run_job(job, on_step=None):
    """Train one job to its last step in its run directory (runs on a Dask worker).

    Returns its record: {"name", "status": "done" | "failed" | "busy" | "stopped",
    "reason", "step", "metric_key", "metric", "peak_rss_b", "peak_scope", "wall_s",
    "attempts", "skipped"}. A finished job returns its done.json without training.
    on_step(name, step), when given, is called after every step (the tests use it).
    """
    from gma_np.sweep.cluster import job_threads
    with job_threads():
        return _run_job(job, on_step)


def _run_job(job, on_step):
    state, record = job_state(job)
    if state == "done":
        return {**record, "skipped": True}
    os.makedirs(job.run_dir, exist_ok=True)
    try:
        lock = JobLock(job.run_dir).__enter__()
    except JobBusy as err:
        return {"name": job.name, "status": "busy", "reason": str(err), "skipped": False}
    try:
        return _train_job(job, lock, on_step)
    finally:
        lock.__exit__(None, None, None)


def _train_job(job, lock, on_step):
    from gma_np.train import TrainConfig, train
    scope = reset_peak_memory()
    start_step = checkpoint_step(job.run_dir)
    n_attempt = len([a for a in attempts(job.run_dir) if a.get("event") == "start"]) + 1
    _append_attempt(job.run_dir, {"event": "start", "attempt": n_attempt, "time": time.time(),
                                  "host": socket.gethostname(), "pid": os.getpid(),
                                  "from_step": start_step})
    t0, c0 = time.perf_counter(), time.process_time()
    base = {"name": job.name, "config": job.config, "skipped": False}

    def step_hook(step):
        lock.touch()
        if on_step is not None:
            on_step(job.name, step)

    status, extra = "failed", {}
    try:
        reason = _incompatible(job)
        if reason is not None:
            raise RuntimeError(reason)
        cfg = TrainConfig.from_dict(job.config)
        with open(os.path.join(job.run_dir, OUT_NAME), "a", encoding="utf-8") as out:
            def say(message):
                out.write(f"{message}\n")
                out.flush()
            result = train(cfg, job.run_dir, resume=start_step is not None, quiet=True,
                           print_fn=say, on_step=step_hook)
        if result.stopped != "done":
            status, extra = "stopped", {"reason": f"the trainer stopped ({result.stopped})"}
        else:
            status, extra = "done", {"step": result.step, "metric_key": _metric_key(job),
                                     "metric": result.val_metric, "metric_name": result.metric}
    except Exception as err:       # any failure of the job itself is its result, not the sweep's
        status, extra = "failed", {"reason": _reason(err), "step": checkpoint_step(job.run_dir)}
    peak = peak_memory_bytes()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    _append_attempt(job.run_dir, {"event": "end", "attempt": n_attempt, "time": time.time(),
                                  "status": status, "peak_rss_b": peak, "peak_scope": scope,
                                  "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})
    history = attempts(job.run_dir)
    peaks = [a["peak_rss_b"] for a in history if a.get("event") == "end" and a.get("peak_rss_b")]
    scopes = {a.get("peak_scope") for a in history if a.get("event") == "end"}
    record = {**base, "status": status, **extra, "attempts": n_attempt,
              "peak_rss_b": max(peaks) if peaks else None,
              "peak_scope": "worker" if "worker" in scopes else "job",
              "wall_s": round(sum(a.get("wall_s", 0.0) for a in history
                                  if a.get("event") == "end"), 3),
              "cpu_s": round(sum(a.get("cpu_s", 0.0) for a in history
                                 if a.get("event") == "end"), 3)}
    if status == "done":
        atomic_write_json(os.path.join(job.run_dir, DONE_NAME), record)
        failed = os.path.join(job.run_dir, FAILED_NAME)
        if os.path.exists(failed):
            os.unlink(failed)
    elif status == "failed":
        atomic_write_json(os.path.join(job.run_dir, FAILED_NAME), record)
    return record


def _metric_key(job):
    meta = read_json(os.path.join(job.run_dir, "checkpoint.json")) or {}
    keys = [k for k in meta if k.startswith("val_")]
    return keys[0] if keys else None


@dataclass(frozen=True)
class ScalingUnit:
    """One mixer's scaling measurement."""
    mixer: str
    spec: dict                # ScalingSpec.to_dict()
    path: str                 # <out>/scaling/<mixer>.json

    @property
    def name(self):
        return f"scaling-{self.mixer}"


def scaling_state(unit):
    from gma_np.sweep.scaling import FORMAT
    rec = read_json(unit.path)
    if rec is not None and _same(rec.get("spec"), unit.spec) and rec.get("format") == FORMAT:
        return "done", rec
    failed = read_json(unit.path + ".failed")
    if failed is not None and _same(failed.get("spec"), unit.spec):
        return "failed", failed
    return "todo", None


def run_scaling(unit):
    """Measure one mixer (runs on a Dask worker); its JSON is the done marker."""
    from gma_np.sweep.cluster import job_threads
    with job_threads():
        return _run_scaling(unit)


def _run_scaling(unit):
    from gma_np.sweep.scaling import ScalingSpec, measure_mixer
    state, record = scaling_state(unit)
    if state == "done":
        return {**record, "status": "done", "skipped": True, "name": unit.name}
    t0 = time.perf_counter()
    try:
        result = measure_mixer(ScalingSpec.from_dict(unit.spec), unit.mixer)
    except Exception as err:
        record = {"name": unit.name, "spec": unit.spec, "status": "failed", "reason": _reason(err)}
        atomic_write_json(unit.path + ".failed", record)
        return {**record, "skipped": False}
    record = {**result, "spec": unit.spec, "wall_s": round(time.perf_counter() - t0, 3)}
    atomic_write_json(unit.path, record)
    if os.path.exists(unit.path + ".failed"):
        os.unlink(unit.path + ".failed")
    return {**record, "status": "done", "skipped": False, "name": unit.name}


# ------------------------------------------------------------------ on the client

@dataclass
class Outcome:
    """What a run_sweep call did: counts of units by how they ended."""
    total: int = 0
    skipped: int = 0          # finished before this call
    done: int = 0             # finished in this call
    failed: list = field(default_factory=list)   # [(name, reason)], earlier failures included
    unfinished: list = field(default_factory=list)   # [(name, why)]: lost, busy, stopped

    @property
    def complete(self):
        return not self.unfinished


def scaling_units(sweep):
    if sweep.scaling is None:
        return []
    spec = sweep.scaling.to_dict()
    return [ScalingUnit(m, spec, os.path.join(sweep.out, SCALING_DIR, f"{m}.json"))
            for m in sweep.scaling.mixers]


def write_sweep_file(sweep):
    atomic_write_json(os.path.join(sweep.out, SWEEP_NAME),
                      {"name": sweep.name, "definition": sweep.definition,
                       "jobs": [{"name": j.name, "settings": [list(s) for s in j.settings],
                                 "run_dir": os.path.relpath(j.run_dir, sweep.out)}
                                for j in sweep.jobs]})


def _line(index, total, name, record):
    status = record.get("status")
    if status == "done" and "metric_key" in record:
        metric = record.get("metric")
        key = record.get("metric_key") or "metric"
        text = "nan" if metric is None else f"{metric:.4f}"
        return (f"[{index}/{total}] {name}: done at step {record.get('step')}, {key} {text}, "
                f"{record.get('wall_s', 0):.0f} s" +
                (f" ({record['attempts']} attempts)" if record.get("attempts", 1) > 1 else ""))
    if status == "done":
        return f"[{index}/{total}] {name}: measured in {record.get('wall_s', 0):.0f} s"
    return f"[{index}/{total}] {name}: {status}: {record.get('reason', '')}"


def run_sweep(sweep, client, *, retry_failed=False, on_step=None, on_result=None,
              print_fn=print, quiet=None):
    """Run every unfinished unit of `sweep` on the Dask `client`; returns an Outcome.

    Finished units are skipped, failed ones too unless retry_failed; the others are
    submitted at once (the scaling measurements first) and reported one line each as
    they end, under a tqdm bar over units. on_result(name, record) is called on the
    client after each line (the tests interrupt a sweep from it). Ctrl-C cancels what is
    still queued or running; its checkpoints stay, and the same call continues them.
    """
    from distributed import as_completed
    from tqdm import tqdm
    os.makedirs(sweep.out, exist_ok=True)
    write_sweep_file(sweep)
    units = [(u.name, u, run_scaling, scaling_state(u)) for u in scaling_units(sweep)]
    units += [(j.name, j, run_job, job_state(j)) for j in sweep.jobs]
    outcome = Outcome(total=len(units))
    todo = []
    for name, unit, fn, (state, record) in units:
        if state == "done":
            outcome.skipped += 1
        elif state == "failed" and not retry_failed:
            outcome.failed.append((name, record.get("reason", "")))
        else:
            todo.append((name, unit, fn))
    before = len(units) - len(todo)
    print_fn(f"{sweep.name}: {len(units)} units ({len(sweep.jobs)} runs, "
             f"{len(units) - len(sweep.jobs)} scaling measurements) in {sweep.out}: "
             f"{outcome.skipped} finished before, {len(outcome.failed)} failed before"
             f"{' (--retry-failed runs them again)' if outcome.failed else ''}, "
             f"{len(todo)} to run")
    disable = quiet if quiet is not None else not sys.stderr.isatty()
    bar = tqdm(total=len(units), initial=before, disable=disable, unit="job",
               dynamic_ncols=True, desc=sweep.name)
    say = print_fn if bar.disable else bar.write
    token = uuid.uuid4().hex[:8]
    futures = {}
    waiting = list(enumerate(todo))
    running = as_completed(loop=client.loop)

    def submit_more():
        # Only as many units in flight as the cluster has threads, in the grid's order
        # (the scaling measurements first). Submitted all at once, Dask assigns each task
        # to a worker when it is submitted: every unit's key is its own task group, whose
        # duration the scheduler cannot estimate, so it neither queues them nor steals
        # them back, and a worker that finished its share early sat idle while another
        # still had three long runs queued. Asking for the next unit when one ends keeps
        # every thread busy on any cluster, and a cluster that grows gets more at once.
        while waiting and running.count() < max(1, sum(client.nthreads().values())):
            i, (name, unit, fn) = waiting.pop(0)
            kwargs = {"on_step": on_step} if fn is run_job and on_step is not None else {}
            future = client.submit(fn, unit, key=f"gma-np-{name}-{token}", pure=False,
                                   priority=len(todo) - i, **kwargs)
            futures[future] = (name, unit)
            running.add(future)

    index = before
    try:
        submit_more()
        for future in running:
            name, unit = futures[future]
            try:
                record = future.result()
            except Exception as err:          # lost with its worker (KilledWorker), cancelled
                record = {"name": name, "status": "lost", "reason": _reason(err)}
            index += 1
            status = record.get("status")
            if status == "done":
                outcome.done += 1
            elif status == "failed":
                outcome.failed.append((name, record.get("reason", "")))
            else:
                outcome.unfinished.append((name, f"{status}: {record.get('reason', '')}"))
            say(_line(index, len(units), name, record))
            bar.update(1)
            if on_result is not None:
                on_result(name, record)
            submit_more()
    except BaseException:
        client.cancel(list(futures), force=True)
        raise
    finally:
        bar.close()
    return outcome
