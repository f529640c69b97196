"""Both stages as SLURM array jobs on a real SLURM, against one process's run (issue #14).

`.ci/run` installs slurm-wlm and munge and starts a one-node cluster on localhost
(`.ci/slurm-up`); there SER_CACHE_REQUIRE_SLURM=1 makes a missing cluster a failure. Elsewhere
the test is skipped without sbatch. Real Whisper tiny.en on a real RAVDESS subset: the array's
cache must equal the single process's bit for bit, and the array's sweep (and the report job
that runs after it) the single process's cells and metrics.

Every process runs torch on one thread (OMP_NUM_THREADS=1, which sbatch passes on to the
jobs), so that the arithmetic, and with it every stored state, is the same in all of them.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ser_cache.cli import main
from ser_cache.report import RESULTS_FILE, SUMMARY_FILE

from conftest import real_checkpoint
from test_e2e import subset
from test_faults import snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

ACTORS = ("01", "02", "03", "04", "05", "06")
EXTRACT = ("--corpus", "ravdess", "--mode", "short", "--limit", "60", "--shard-mb", "2", "--device", "cpu")
SWEEP = ("--layers", "2,4", "--heads", "linear,mean", "--epochs", "3", "--folds", "3", "--jobs", "1",
         "--device", "cpu", "--compute-dtype", "float32")
METRICS = ("ua", "wa", "macro_f1", "val_ua", "setting", "epoch", "n_test", "layer_weights")
WAIT_S = 300


@pytest.fixture(scope="module")
def cluster():
    """A SLURM that answers (skip without one, unless SER_CACHE_REQUIRE_SLURM=1)."""
    def missing(why):
        if os.environ.get("SER_CACHE_REQUIRE_SLURM") == "1":
            pytest.fail(f"{why} (SER_CACHE_REQUIRE_SLURM=1; .ci/slurm-up starts a one-node SLURM)")
        pytest.skip(f"{why}; .ci/slurm-up starts a one-node SLURM (as root)")

    if shutil.which("sbatch") is None:
        missing("sbatch not found")
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if states.returncode != 0 or not {"idle", "mixed", "allocated"} & set(states.stdout.split()):
        missing(f"no SLURM node ready: sinfo says {(states.stdout + states.stderr).strip()!r}")


def run_cli(*args):
    """`ser-cache ARGS` in a fresh process on one torch thread, as the array's jobs run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ser_cache.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def submit(*args) -> list[str]:
    """`ser-cache slurm ARGS` (in this process); the job ids it submitted."""
    result = CliRunner().invoke(main, ["slurm", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return re.findall(r"submitted \w+ job (\d+)", result.output)


def wait_for(job_ids: list[str]) -> dict[str, str]:
    """Wait until the jobs (array tasks too) have left the queue; {job: exit code} per task."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
        if queued.returncode == 0 and not queued.stdout.strip():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", *job_ids])
        pytest.fail(f"jobs {job_ids} still queued after {WAIT_S} s: {queued.stdout}")
    codes = {}
    for job in job_ids:  # finished jobs stay in scontrol for MinJobAge (300 s in .ci/slurm-up)
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        for line in shown.splitlines():
            task = re.search(r"JobId=(\d+)", line).group(1)
            codes[task] = re.search(r"\bExitCode=(\S+)", line).group(1)
    return codes


def results(sweep: Path) -> dict:
    with open(sweep / RESULTS_FILE, newline="", encoding="utf-8") as f:
        return {(r["cache"], r["layer"], r["head"], r["seed"], r["fold"]): [r[m] for m in METRICS]
                for r in csv.DictReader(f)}


def test_extract_and_sweep_as_array_jobs_equal_one_process(cluster, ravdess_dir, tmp_path, monkeypatch):
    data, model = subset(ravdess_dir, tmp_path, ACTORS), real_checkpoint("tiny.en")
    one, array = tmp_path / "one", tmp_path / "array"
    one.mkdir(), array.mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # passed on to the jobs by sbatch
    if os.environ.get("PYTHONPATH"):  # the jobs start in another folder: the same code must be found there
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep)))
    monkeypatch.chdir(array)

    jobs = submit("--tasks", 3, "--cpus-per-task", 1, "--time", "10:00", "extract", data, "--model", model,
                  "--out", "cache", *EXTRACT)
    run_cli("extract", data, "--model", model, "--out", one / "cache", *EXTRACT)  # meanwhile, one process
    codes = wait_for(jobs)
    assert len(codes) == 3 and set(codes.values()) == {"0:0"}, codes
    logs = sorted((array / "slurm").glob("*.out"))
    assert len(logs) == 3 and all("cache cache: " in log.read_text() for log in logs)
    assert not [log for log in logs if "shards: 0 written now" in log.read_text()]  # each task did its part
    reference, got = snapshot(one / "cache"), snapshot(array / "cache")
    assert len(reference["plan"]) >= 6  # enough shards for three tasks to share
    assert got["plan"] == reference["plan"] and got["skipped"] == reference["skipped"]
    for s in reference["frames"]:
        assert got["ids"][s] == reference["ids"][s]
        np.testing.assert_array_equal(got["offsets"][s], reference["offsets"][s])
        np.testing.assert_array_equal(got["frames"][s], reference["frames"][s], err_msg=f"layer {s}")

    jobs = submit("--tasks", 3, "--cpus-per-task", 1, "--time", "10:00", "sweep", "cache", "--out", "sweep", *SWEEP)
    assert len(jobs) == 2  # the array, and the report after it
    run_cli("sweep", one / "cache", "--out", one / "sweep", *SWEEP)
    codes = wait_for(jobs)
    assert len(codes) == 4 and set(codes.values()) == {"0:0"}, codes
    runs = [re.search(r"(\d+) folds run", log.read_text()) for log in (array / "slurm").glob("ser-cache-sweep-sweep-*_*.out")]
    assert len(runs) == 3 and sum(int(m.group(1)) for m in runs) == 12  # the parts: every fold once
    report_log = (array / "slurm" / f"ser-cache-sweep-sweep-report-{jobs[1]}.out").read_text()
    assert "sweep sweep: complete (4 cells, 12 folds)" in report_log
    assert results(array / "sweep") == results(one / "sweep")
    assert "**Partial:**" not in (array / "sweep" / SUMMARY_FILE).read_text()
