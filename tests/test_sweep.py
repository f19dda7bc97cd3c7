"""gma-np compare (gma_np.sweep): the grid, the table read back from the runs' logs, and
sweeps on a Dask LocalCluster of 2 workers: a killed worker, an interrupted client and a
failing job, each followed by the same sweep again, end with the uninterrupted sweep's
table and the same parameters bit for bit. The cluster tests need `distributed` (the
sweep extra); the others run without it."""

import functools
import json
import math
import os
import statistics
import sys

import numpy as np
import pytest

from gma_np.sweep import GridError, build_sweep
from gma_np.mixers import MIXER_NAMES
from gma_np.sweep.grid import PRESETS
from gma_np.sweep.results import DETERMINISTIC_COLUMNS, collect, read_log
from gma_np.sweep.runner import (ATTEMPTS_NAME, DONE_NAME, attempts, job_state, run_job,
                                 run_sweep)
from gma_np.sweep.scaling import ScalingSpec, fit_slope, measure_mixer, slopes

# A sweep of the test training preset: 2 mixers x 2 seeds, 12 steps, a checkpoint every 4.
TINY = {"name": "tiny",
        "tasks": {"lm": {"preset": "test", "steps": 12, "eval_interval": 6, "eval_tokens": 256,
                         "checkpoint_interval": 4, "log_interval": 1}},
        "grid": [{"mixer": ["gma", "linear"], "task": "lm", "seed": [0, 1]}]}
CRASH_JOB, CRASH_STEP = "lm-gma-seed1", 6           # after the step-4 checkpoint, before 8's


# ---------------------------------------------------------------- hooks run on the workers

def crash_once(marker_dir, name, step):
    """Kill the worker process on the first attempt of CRASH_JOB at CRASH_STEP."""
    marker = os.path.join(marker_dir, "crashed")
    if name == CRASH_JOB and step == CRASH_STEP and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def fail_job(name, step):
    if name == "lm-linear-seed0" and step == 3:
        raise RuntimeError("the test's failure at step 3")


def job_threads(name, step):
    """Fail the job if Numba or BLAS has more than one thread in the thread that trains it."""
    import numba
    import threadpoolctl
    blas = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
            if lib.get("user_api") == "blas"]
    if numba.get_num_threads() != 1 or any(b != 1 for b in blas):
        raise RuntimeError(f"threads in the job: numba {numba.get_num_threads()}, blas {blas}")


# ---------------------------------------------------------------- helpers

def _deterministic(sweep):
    """The table's and the jobs' columns that do not depend on timing, and every log's
    lines without their times."""
    jobs, rows, _ = collect(sweep)
    keep = lambda r: {k: r[k] for k in DETERMINISTIC_COLUMNS if k in r}
    logs = {j.name: [{k: v for k, v in rec.items() if k not in ("elapsed_s", "tokens_per_s")}
                     for rec in read_log(j.run_dir)] for j in sweep.jobs}
    return [keep(r) for r in rows], [keep(r) for r in jobs], logs


def _params(run_dir):
    with np.load(os.path.join(run_dir, "checkpoint.npz"), allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k != "meta"}


def _assert_same_parameters(sweep_a, sweep_b):
    for a, b in zip(sweep_a.jobs, sweep_b.jobs):
        pa, pb = _params(a.run_dir), _params(b.run_dir)
        assert sorted(pa) == sorted(pb), a.name
        for k in pa:
            assert np.array_equal(pa[k], pb[k]), f"{a.name}: {k} differs"


def _check_table_against_logs(sweep):
    """Every number of the table equals the one computed here from the runs' log.jsonl."""
    jobs, rows, _ = collect(sweep)
    for row in rows:
        mine = [j for j in sweep.jobs if dict(j.group) == row["settings"]]
        finals = []
        for j in mine:
            recs = [json.loads(line) for line in open(os.path.join(j.run_dir, "log.jsonl"))]
            finals.append([r["val_bpb"] for r in recs if "val_bpb" in r and r["step"] == 12][-1])
            rates = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
            job = next(x for x in jobs if x["name"] == j.name)
            assert job["metric"] == finals[-1]
            assert job["tokens_per_s"] == statistics.median(rates)
        assert row["n_done"] == len(mine) == 2
        assert row["mean"] == statistics.fmean(finals)
        assert row["std"] == statistics.stdev(finals)
        assert row["metric_key"] == "val_bpb" and row["status"] == "ok"
        assert isinstance(row["params"], int) and row["params"] > 0


# ---------------------------------------------------------------- without Dask

def test_grid_names_dotted_fields_and_exclude(tmp_path):
    d = {"name": "g", "base": {"model": {"d_model": 16}, "steps": 3},
         "tasks": {"lm": {"preset": "test"}},
         "grid": [{"mixer": ["gma", "softmax"], "seed": [0, 1]},
                  {"mixer": "gma", "model.n_components": [3, 5], "seed": 0,
                   "exclude": [{"model.n_components": 3, "seed": 0}]}]}
    sweep = build_sweep(d, tmp_path)
    names = [j.name for j in sweep.jobs]
    # the test preset's K is 5: the second table's K=5 job is the first table's gma seed 0
    assert names == ["lm-gma-n_components=5-seed0", "lm-gma-n_components=5-seed1",
                     "lm-softmax-n_components=5-seed0", "lm-softmax-n_components=5-seed1"]
    job = sweep.jobs[2]
    assert job.config["model"]["mixer"] == "softmax" and job.config["model"]["d_model"] == 16
    assert job.config["steps"] == 3 and job.run_dir == os.path.join(tmp_path, "runs", job.name)
    assert sweep.axes == ("task", "model.mixer", "model.n_components", "seed")
    d["grid"][1]["exclude"] = []
    assert "lm-gma-n_components=3-seed0" in [j.name for j in build_sweep(d, tmp_path).jobs]


def test_grid_file_toml_equals_json(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('name = "s"\n[base]\n"model.d_model" = 16\n[tasks.lm]\npreset = "test"\n'
                    'steps = 4\n[[grid]]\nmixer = ["gma", "linear"]\nseed = [0, 1]\n'
                    '"task_params.dataset" = ["embedded"]\n')
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"name": "s", "base": {"model.d_model": 16},
                              "tasks": {"lm": {"preset": "test", "steps": 4}},
                              "grid": [{"mixer": ["gma", "linear"], "seed": [0, 1],
                                        "task_params.dataset": ["embedded"]}]}))
    from gma_np.sweep import load_sweep
    a = load_sweep(grid_file=str(toml), out=tmp_path)
    b = load_sweep(grid_file=str(js), out=tmp_path)
    assert [(j.name, j.config) for j in a.jobs] == [(j.name, j.config) for j in b.jobs]
    assert a.jobs[0].name == "lm-gma-dataset=embedded-seed0"


@pytest.mark.parametrize("grid, expect", [
    ({"mixer": ["gma"], "model.d_modle": [8]}, "unknown field 'model.d_modle'"),
    ({"mixer": ["gma"], "seeds": [0]}, "unknown field 'seeds'"),
    ({"mixer": ["nope"]}, "job (model.mixer='nope')"),
    ({"mixer": ["gma"], "steps": [0]}, "steps: expected a positive integer"),
    ({"mixer": ["gma"], "seed": []}, "empty list"),
])
def test_grid_errors_name_the_field(tmp_path, grid, expect):
    with pytest.raises(GridError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        build_sweep({"tasks": {"lm": {"preset": "test"}}, "grid": [grid]}, tmp_path)


def test_presets_build():
    for name in PRESETS:
        sweep = build_sweep(PRESETS[name], "/nonexistent/out")
        assert len({j.name for j in sweep.jobs}) == len(sweep.jobs) > 0
    quick = build_sweep(PRESETS["quick"], "/x")
    assert {j.config["task"] for j in quick.jobs} == {"lm", "listops"}
    for name in ("quick", "paper", "listops"):        # every mixer runs ListOps, mamba causally
        assert {j.config["model"]["mixer"] for j in build_sweep(PRESETS[name], "/x").jobs
                if j.config["task"] == "listops"} == set(MIXER_NAMES)


def test_fit_slope_of_a_power_law():
    n = [16, 32, 64, 128]
    assert math.isclose(fit_slope(n, [3.0 * x ** 1.5 for x in n])[0], 1.5, rel_tol=1e-12)
    assert math.isclose(fit_slope(n, [1.0, 1.0, 4.0, 16.0], fit_from=32)[0], 2.0, rel_tol=1e-12)


def test_scaling_measures_every_length():
    spec = ScalingSpec.from_dict(PRESETS["test"]["scaling"])
    rec = measure_mixer(spec, "linear")
    assert rec["lengths"] == [16, 32, 64] and all(t > 0 for t in rec["time_s"] + rec["cpu_s"])
    # linear attention keeps O(N) activations: the memory of a step grows with N
    assert rec["memory_b"][0] < rec["memory_b"][1] < rec["memory_b"][2]
    assert math.isfinite(slopes(rec)["memory"])


def test_jobs_in_process_table_from_logs_and_failure_reason(tmp_path):
    sweep = build_sweep(TINY, tmp_path)
    for job in sweep.jobs:
        rec = run_job(job, on_step=fail_job)
        assert rec["status"] == ("failed" if job.name == "lm-linear-seed0" else "done"), rec
    failed = next(j for j in sweep.jobs if j.name == "lm-linear-seed0")
    assert job_state(failed)[0] == "failed"
    jobs, rows, _ = collect(sweep)
    row = next(r for r in rows if r["settings"]["model.mixer"] == "linear")
    assert row["n_done"] == 1 and row["std"] is None
    assert "seed 0 failed: RuntimeError: the test's failure at step 3" in row["status"]
    # a finished job is not trained again: its record comes back from done.json
    done = next(j for j in sweep.jobs if j.name == "lm-gma-seed0")
    mtime = os.stat(os.path.join(done.run_dir, DONE_NAME)).st_mtime_ns
    assert run_job(done)["skipped"] is True
    assert os.stat(os.path.join(done.run_dir, DONE_NAME)).st_mtime_ns == mtime
    assert len([a for a in attempts(done.run_dir) if a["event"] == "start"]) == 1


def test_compare_without_dask_says_how_to_install(monkeypatch, capsys):
    from gma_np.cli import main
    monkeypatch.setitem(sys.modules, "distributed", None)        # import distributed fails
    assert main(["compare", "--preset", "test"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "gma_np[sweep]"' in err[0], err


def test_compare_usage_errors(capsys):
    from gma_np.cli import main
    for argv in (["compare", "--preset", "test", "--grid", "x.toml"],
                 ["compare", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
                 ["compare", "--preset", "huge"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


# ---------------------------------------------------------------- on a LocalCluster of 2 workers

@pytest.fixture(scope="module")
def client():
    pytest.importorskip("distributed")
    from gma_np.sweep.cluster import open_client
    with open_client(workers=2) as (c, about):
        assert "2 worker processes" in about
        yield c


@pytest.fixture(scope="module")
def reference(client, tmp_path_factory):
    """The uninterrupted sweep: every job done, the table read back from the logs."""
    sweep = build_sweep(TINY, tmp_path_factory.mktemp("reference"))
    outcome = run_sweep(sweep, client, on_step=job_threads, print_fn=lambda *a: None)
    assert outcome.complete and outcome.done == 4 and not outcome.failed, outcome
    return sweep


def test_workers_have_one_thread(client):
    from gma_np.sweep.cluster import describe_worker
    for info in client.run(describe_worker).values():
        assert info["numba_threads"] == 1 and info["blas_threads"] == 1, info
        assert info["NUMBA_NUM_THREADS"] == "1"


def test_sweep_table_equals_the_logs(reference):
    _check_table_against_logs(reference)
    for job in reference.jobs:
        assert len([a for a in attempts(job.run_dir) if a["event"] == "start"]) == 1


def test_killed_worker_resumes_exactly(client, reference, tmp_path):
    sweep = build_sweep(TINY, tmp_path / "sweep")
    lines = []
    outcome = run_sweep(sweep, client, on_step=functools.partial(crash_once, str(tmp_path)),
                        print_fn=lines.append)
    assert os.path.exists(tmp_path / "crashed")
    # Dask ran the lost task again on a live worker; it resumed from the step-4 checkpoint
    if not outcome.complete:                       # lost more than Dask retries: run again
        outcome = run_sweep(sweep, client, print_fn=lines.append)
    assert outcome.complete and not outcome.failed, (outcome, lines)
    crashed = next(j for j in sweep.jobs if j.name == CRASH_JOB)
    starts = [a for a in attempts(crashed.run_dir) if a["event"] == "start"]
    assert [a["from_step"] for a in starts] == [None, 4], starts
    mtimes = {j.name: os.stat(os.path.join(j.run_dir, DONE_NAME)).st_mtime_ns for j in sweep.jobs}
    # the same sweep again: nothing is trained, nothing rewritten
    again = run_sweep(sweep, client, print_fn=lines.append)
    assert again.skipped == 4 and again.done == 0
    assert mtimes == {j.name: os.stat(os.path.join(j.run_dir, DONE_NAME)).st_mtime_ns
                      for j in sweep.jobs}
    assert _deterministic(sweep) == _deterministic(reference)
    _assert_same_parameters(sweep, reference)


def test_interrupted_client_then_same_sweep(client, reference, tmp_path):
    from gma_np.sweep.cluster import open_client
    sweep = build_sweep(TINY, tmp_path)

    def interrupt(name, record):
        raise KeyboardInterrupt

    # on a cluster of its own, closed on the way out as the command's is on Ctrl-C: the
    # jobs still running die with its workers, mid-training
    with pytest.raises(KeyboardInterrupt):
        with open_client(workers=2) as (own, _):
            run_sweep(sweep, own, on_result=interrupt, print_fn=lambda *a: None)
    finished = [j for j in sweep.jobs if job_state(j)[0] == "done"]
    assert 1 <= len(finished) < 4
    mtimes = {j.name: os.stat(os.path.join(j.run_dir, DONE_NAME)).st_mtime_ns for j in finished}
    outcome = run_sweep(sweep, client, print_fn=lambda *a: None)
    assert outcome.complete and outcome.skipped == len(finished)
    for j in finished:
        assert os.stat(os.path.join(j.run_dir, DONE_NAME)).st_mtime_ns == mtimes[j.name]
        assert len([a for a in attempts(j.run_dir) if a["event"] == "start"]) == 1
    assert _deterministic(sweep) == _deterministic(reference)
    _assert_same_parameters(sweep, reference)


def test_failing_job_is_reported_and_the_others_finish(client, tmp_path):
    sweep = build_sweep(TINY, tmp_path)
    lines = []
    outcome = run_sweep(sweep, client, on_step=fail_job, print_fn=lines.append)
    assert outcome.done == 3 and outcome.unfinished == []
    assert outcome.failed == [("lm-linear-seed0", "RuntimeError: the test's failure at step 3")]
    assert any("lm-linear-seed0: failed: RuntimeError: the test's failure" in l for l in lines)
    # the same sweep again reports it without running it
    again = run_sweep(sweep, client, print_fn=lines.append)
    assert again.skipped == 3 and [n for n, _ in again.failed] == ["lm-linear-seed0"]
    failed = next(j for j in sweep.jobs if j.name == "lm-linear-seed0")
    assert len([a for a in attempts(failed.run_dir) if a["event"] == "start"]) == 1
    assert os.path.exists(os.path.join(failed.run_dir, ATTEMPTS_NAME))


def test_compare_command_twice(tmp_path, capsys):
    pytest.importorskip("distributed")
    from gma_np.cli import main
    out = str(tmp_path / "c")
    assert main(["compare", "--preset", "test", "--out", out, "--workers", "2"]) == 0
    first = capsys.readouterr().out
    assert "| gma | 2/2 |" in first and "| linear | 2/2 |" in first
    table = open(os.path.join(out, "results.md")).read()
    assert "## Time and memory per step against N" in table
    for name in ("results.csv", "jobs.csv", "scaling.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert main(["compare", "--preset", "test", "--out", out, "--workers", "2"]) == 0
    assert "6 finished before, 0 failed before, 0 to run" in capsys.readouterr().out
    history = open(os.path.join(out, "results.md")).read()
    assert "History: 2 invocations of the command on this sweep directory" in history
    assert "killed" not in history.split("History:")[1].split("\n")[0]


def test_where_gma_stands_says_when_the_seeds_do_not_resolve_it():
    from gma_np.sweep.results import where_gma_stands
    row = lambda mixer, mean, std: {"settings": {"task": "lm", "model.mixer": mixer},
                                    "metric_key": "val_bpb", "mean": mean, "std": std,
                                    "ms_per_step": None}
    text = where_gma_stands([row("gma", 2.0, 0.05), row("softmax", 1.96, 0.02),
                             row("linear", 2.5, 0.01), row("mamba", 1.5, None)])
    assert "beaten by mamba 1.5000, softmax 1.9600 ± 0.0200 (within the spread)" in text
    assert "it beats linear." in text


def test_invocations_count_the_killed_ones(tmp_path):
    from gma_np.sweep.results import invocation_summary, record_invocation
    assert invocation_summary(str(tmp_path)) == ""
    record_invocation(str(tmp_path), "start")                 # killed: no end line
    record_invocation(str(tmp_path), "start")
    record_invocation(str(tmp_path), "interrupted", 60.0)
    record_invocation(str(tmp_path), "start")
    record_invocation(str(tmp_path), "end", 120.0, ran=3)
    assert invocation_summary(str(tmp_path)) == (
        "3 invocations of the command on this sweep directory, 3.0 min of wall time in all; "
        "1 interrupted (Ctrl-C); 1 killed without a record (their time is not counted)")
