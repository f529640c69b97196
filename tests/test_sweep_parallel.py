"""Several sweep processes on one --out, `--part I/N`, SLURM array variables, `ser-cache slurm`
(issue #14). Fast: tiny synthetic caches, no SLURM needed (test_slurm.py runs a real one).

Every cell fold of a sweep must run exactly once however many processes share the folder, the
result must equal one process's, a claim of a killed process must be taken over, and every
process's last line and exit status must say how far the sweep is.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from ser_cache import sweeping as S
from ser_cache.cache import ShardClaims, open_cache
from ser_cache.cli import main
from ser_cache.encoder import load_encoder
from ser_cache.errors import OptionError
from ser_cache.extract import ExtractOptions, extract
from ser_cache.report import RESULTS_FILE, SUMMARY_FILE
from ser_cache.results import SweepFolder
from ser_cache.slurm import array_part, resolve_part
from ser_cache.sweeping import CellFold, SweepSpec, part_of, run_sweep
from ser_cache.config import TrainConfig

from conftest import write_corpus
from test_faults import extract_args, good_rows, write_csv

N_FOLDS = 3
TRAIN = TrainConfig(epochs=2, compute_dtype="float32")  # what SWEEP_ARGS ask for
SWEEP_ARGS = ("--layers", "1-2", "--heads", "linear,mean", "--epochs", "2", "--folds", str(N_FOLDS),
              "--jobs", "1", "--device", "cpu", "--compute-dtype", "float32")


pytestmark = pytest.mark.usefixtures("one_thread_per_job")  # conftest


@pytest.fixture(scope="module")
def cache(tiny_checkpoint, tmp_path_factory) -> Path:
    """A tiny cache: 6 speakers x 4 utterances, 3 classes, 3 states."""
    root = tmp_path_factory.mktemp("parallel-cache")
    records = write_corpus(root / "corpus", n_speakers=6, per_speaker=4)
    extract(records, root / "tiny", "csv", load_encoder(str(tiny_checkpoint)), ExtractOptions(mode="trim", progress=False))
    return root / "tiny"


def spec_for(cache: Path) -> SweepSpec:
    return SweepSpec(caches=[cache], layers="1-2", heads=["linear", "mean"], train=TRAIN, n_folds=N_FOLDS)


N_CELL_FOLDS = 2 * 2 * N_FOLDS  # layers x heads x folds


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> dict:
    """One process's sweep: per cell fold, what the table shows."""
    out = tmp_path_factory.mktemp("parallel") / "one"
    outcome = run_sweep(spec_for(cache), out, jobs=1, progress=False)
    assert outcome.state.complete and outcome.folds_run == N_CELL_FOLDS
    return rows_of(out)


def rows_of(out: Path) -> dict:
    with open(out / RESULTS_FILE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len({(r["layer"], r["head"], r["seed"], r["fold"]) for r in rows}) == len(rows)  # no cell fold twice
    return {(r["layer"], r["head"], r["seed"], r["fold"]): (r["ua"], r["wa"], r["setting"], r["epoch"]) for r in rows}


# --- parts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_cell_folds", [1, 5, 12, 13])
def test_parts_are_disjoint_complete_contiguous_and_balanced(n_cell_folds):
    cell_folds = [CellFold("c", layer, "mean", 0, fold) for layer in range(5) for fold in range(3)][:n_cell_folds]
    for n in range(1, n_cell_folds + 3):
        parts = [part_of(cell_folds, (i, n)) for i in range(n)]
        assert [t for p in parts for t in p] == cell_folds  # disjoint, complete, in the plan's order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [part_of(list(cell_folds), (i, n)) for i in range(n)]  # the same in every job


def test_array_variables_give_the_part_and_an_explicit_option_wins():
    assert array_part({}) is None and resolve_part(None, "--part", {}) == (0, 1)
    assert array_part({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    # --array 1-4: ids from 1; --array 0-6:2: steps of 2
    assert array_part({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == (0, 4)
    assert array_part({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
                       "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 4)
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_part("1/2", "--shard", env) == (1, 2)
    with pytest.raises(OptionError, match="gaps"):  # --array 1,3,7: no part for id 7
        array_part({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"})
    with pytest.raises(OptionError, match="SLURM_ARRAY_TASK_COUNT"):
        array_part({"SLURM_ARRAY_TASK_ID": "0"})
    with pytest.raises(OptionError, match="0 <= I < N"):
        resolve_part("2/2", "--part", env)


# --- several processes on one folder -------------------------------------------------------------


def test_two_sweeps_started_together_run_each_cell_fold_once_and_equal_one_sweep(cache, reference, tmp_path, monkeypatch):
    out, real, ran, lock = tmp_path / "two", S.run_cell_fold, [], threading.Lock()
    start = threading.Barrier(2)

    def recording(data, job, test_corpus=None):
        # One cell fold trains at a time: the two sweeps are threads of one process here, and
        # torch's random generator is the process's (sweeps on a cluster are processes of
        # their own); what races is what this test is about, the claims, taken before this.
        with lock:
            ran.append(job.cell_fold)
            return real(data, job, test_corpus)

    monkeypatch.setattr(S, "run_cell_fold", recording)
    outcomes, errors = [], []

    def one():
        try:
            start.wait()
            outcomes.append(run_sweep(spec_for(cache), out, jobs=1, progress=False))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(ran) == len(set(ran)) == N_CELL_FOLDS  # each cell fold once, all of them
    assert sum(o.folds_run for o in outcomes) == N_CELL_FOLDS
    # Each ended with its part done or in the other's hands; the later to look saw it all done.
    assert all(o.state.own_part_done for o in outcomes) and any(o.state.complete for o in outcomes)
    assert rows_of(out) == reference
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.tmp"))  # claims let go, nothing left
    assert len(SweepFolder(out).timing()) == sum(o.folds_run > 0 for o in outcomes)


def hold_claim(path: Path) -> subprocess.Popen:
    """Another process holding the flock at `path`, as a live sweep holds a cell fold's claim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_cell_fold_held_by_a_live_process_is_left_to_it_and_taken_once_it_is_killed(cache, reference, tmp_path):
    out = tmp_path / "held"
    run_sweep(spec_for(cache), out, jobs=1, progress=False, part=(0, N_CELL_FOLDS))  # makes the folder: one cell fold
    held = CellFold("tiny", 2, "mean", 0, 1)
    other = hold_claim(SweepFolder(out).claim_path(held.cache, held.layer, held.head, held.seed, held.fold))
    try:
        result = CliRunner().invoke(main, ["sweep", str(cache), "--out", str(out), *SWEEP_ARGS])
        assert result.exit_code == 0, result.output  # its part (all) is done or in a live job's hands
        last = result.output.strip().splitlines()[-1]
        assert last == f"sweep {out}: {N_CELL_FOLDS - 1} of {N_CELL_FOLDS} folds done; 1 claimed by other running jobs"
        assert not held.path(out).exists()
        report = CliRunner().invoke(main, ["report", str(out)])
        assert f"{2 * 2 - 1} of {2 * 2} cells complete ({N_CELL_FOLDS - 1} of {N_CELL_FOLDS} folds, 1 claimed by running jobs)" in report.output
        assert "**Partial:**" in (out / SUMMARY_FILE).read_text()
    finally:
        other.kill()
        other.wait()
    result = CliRunner().invoke(main, ["sweep", str(cache), "--out", str(out), *SWEEP_ARGS])
    assert result.exit_code == 0 and result.output.strip().splitlines()[-1] == f"sweep {out}: complete ({N_CELL_FOLDS} folds)"
    assert rows_of(out) == reference
    assert "**Partial:**" not in (out / SUMMARY_FILE).read_text()


def test_a_claim_let_go_by_a_killed_process_mid_sweep_is_taken_in_a_further_pass(cache, reference, tmp_path, monkeypatch):
    out = tmp_path / "taken-over"
    run_sweep(spec_for(cache), out, jobs=1, progress=False, part=(N_CELL_FOLDS - 1, N_CELL_FOLDS))  # the folder, one cell fold
    first = CellFold("tiny", 1, "linear", 0, 0)  # the first cell fold of the plan: passed over, held
    other = hold_claim(SweepFolder(out).claim_path(first.cache, first.layer, first.head, first.seed, first.fold))
    real, ran = S.run_cell_fold, []

    def kill_other_then_run(data, job, test_corpus=None):
        if other.poll() is None:  # the holder dies while this process works on other cell folds
            other.kill()
            other.wait()
        ran.append(job.cell_fold)
        return real(data, job, test_corpus)

    monkeypatch.setattr(S, "run_cell_fold", kill_other_then_run)
    try:
        outcome = run_sweep(spec_for(cache), out, jobs=1, progress=False)
    finally:
        other.kill()
        other.wait()
    assert ran[-1] == first and len(ran) == len(set(ran)) == N_CELL_FOLDS - 1
    assert outcome.state.complete and rows_of(out) == reference


def test_parts_from_the_slurm_environment_split_the_sweep_and_each_says_what_is_left(cache, reference, tmp_path):
    out = tmp_path / "parts"
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    second = CliRunner().invoke(main, ["sweep", str(cache), "--out", str(out), *SWEEP_ARGS], env=env)
    assert second.exit_code == 0, second.output
    assert second.output.strip().splitlines()[-1] == (
        f"sweep {out}: {N_CELL_FOLDS // 2} of {N_CELL_FOLDS} folds done; {N_CELL_FOLDS // 2} left for other --part parts "
        "(run those jobs, or this command without --part, to finish)")
    # The second half of the plan: layer 2 only, so this part read one layer.
    assert {k[0] for k in rows_of(out)} == {"2"} and SweepFolder(out).timing()[-1].layers_read == 1
    first = CliRunner().invoke(main, ["sweep", str(cache), "--out", str(out), *SWEEP_ARGS, "--part", "0/2"], env=env)
    assert first.exit_code == 0 and first.output.strip().splitlines()[-1] == f"sweep {out}: complete ({N_CELL_FOLDS} folds)"
    assert rows_of(out) == reference


def test_extract_takes_its_shard_part_from_the_slurm_environment(tiny_checkpoint, tmp_path):
    corpus = tmp_path / "corpus"
    write_csv(corpus, good_rows(corpus, n_speakers=2, per_speaker=4))
    out = tmp_path / "cache"
    # --array 4-5: this is task 5, the second of two
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "4"}
    result = CliRunner().invoke(main, extract_args(corpus, tiny_checkpoint, out), env=env)
    assert result.exit_code == 0, result.output
    shards = sorted(int(p.stem.split("-")[1]) for p in (out / "shards").glob("*.h5"))
    n = len(open_cache(out).plan)
    assert n >= 3 and shards == list(range(1, n, 2))
    assert "of other --shard parts missing" in result.output.strip().splitlines()[-1]
    other = hold_claim(ShardClaims(out / "shards").lock_path(0))  # as a running job writing shard 0
    try:
        shown = CliRunner().invoke(main, ["inspect", str(out)]).output
    finally:
        other.kill()
        other.wait()
    assert f"shards {len(shards)} of {n}, missing {list(range(0, n, 2))} (1 being written by running jobs)" in shown
    whole = CliRunner().invoke(main, extract_args(corpus, tiny_checkpoint, out, "--shard", "0/1"), env=env)
    assert whole.exit_code == 0 and whole.output.strip().splitlines()[-1].startswith(f"cache {out}: complete")


# --- ser-cache slurm -------------------------------------------------------------------------------


def test_slurm_dry_run_prints_an_array_and_a_dependent_report_job(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sw"
    result = CliRunner().invoke(main, ["slurm", "--tasks", "4", "--time", "1:00:00", "--cpus-per-task", "2",
                                       "--mem", "4G", "--partition", "short", "--dry-run",
                                       "sweep", str(cache), "--out", str(out), *SWEEP_ARGS])
    assert result.exit_code == 0, result.output
    text = result.output
    for line in ("#SBATCH --array=0-3", "#SBATCH --time=1:00:00", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=4G",
                 "#SBATCH --partition=short", "--dependency=afterok:", "#SBATCH --kill-on-invalid-dep=yes"):
        assert line in text, line
    assert f"sweep {cache} --out {out} --layers 1-2" in text and f"report {out}" in text
    assert not out.exists() and not (tmp_path / "slurm").exists()  # a dry run writes nothing
    refused = CliRunner().invoke(main, ["slurm", "--tasks", "2", "--dry-run", "sweep", str(cache), "--out", str(out),
                                        "--part", "0/2"])
    assert refused.exit_code != 0 and "drop --part" in refused.output
    after = CliRunner().invoke(main, ["slurm", "--tasks", "2", "--after", "77", "--dry-run", "sweep", str(cache),
                                      "--out", str(out), *SWEEP_ARGS])
    assert after.exit_code == 0 and after.output.count("#SBATCH --dependency=afterok:77") == 1  # the array only
    typo = CliRunner().invoke(main, ["slurm", "--tasks", "2", "--dry-run", "sweep", str(cache), "--out", str(out),
                                     "--haeds", "mean"])
    assert typo.exit_code != 0 and "--haeds" in typo.output  # found now, not in every queued task


def test_slurm_submits_the_report_job_after_the_array(cache, tmp_path, monkeypatch):
    """With a stand-in sbatch that records its arguments and answers like `sbatch --parsable`."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nn=$(wc -l < {calls})\necho "$((4000 + n));cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["slurm", "--tasks", "3", "sweep", str(cache), "--out", "sw", *SWEEP_ARGS])
    assert result.exit_code == 0, result.output
    array_call, report_call = calls.read_text().splitlines()
    script = tmp_path / "slurm" / "ser-cache-sweep-sw.sbatch"
    assert array_call == f"--parsable {script}" and "#SBATCH --array=0-2" in script.read_text()
    assert report_call == f"--parsable --dependency=afterok:4001 {script.with_name('ser-cache-sweep-sw-report.sbatch')}"
    assert "submitted array job 4001 (3 tasks)" in result.output and "report job 4002" in result.output
