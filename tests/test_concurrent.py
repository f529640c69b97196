"""Several `ser-cache extract` jobs on one --out folder at once (issue #14).

Jobs started together, with and without `--shard I/N`, share the shards: each is written
once, the cache equals a single job's bit for bit, and every job's exit status and last line
tell the truth. A job killed at a random point while writing neither damages the cache nor
blocks the others or a re-run. A claim held by a live job is respected and reported.

The jobs are processes forked from test_faults' server (torch imported once), each with one
thread: the arithmetic is then that of the single-job reference, so states compare exactly.
"""
from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ser_cache import cache as C
from ser_cache.cache import open_cache
from ser_cache.cli import main
from ser_cache.extract import final_state
from ser_cache.locks import CREATE_LOCK

from test_faults import SEED, After, _cli_in_child, assert_same_cache, extract_args, forkserver, good_rows, snapshot, \
    write_csv

RUN_ARGS = ("--batch-size", "4", "--dtype", "float32")
LAST_LINE = re.compile(
    r"cache (?P<out>\S+): (?:(?P<complete>complete)|(?P<done>\d+) of (?P<n>\d+) shards complete"
    r"(?:; (?P<writing>\d+) shards? still being written by other jobs)?"
    r"(?:; (?P<missing>\d+) shards? missing \(re-run to finish\))?"
    r"(?:; (?P<others>\d+) shards? of other --shard parts missing \(run those jobs, or this command without --shard, to finish\))?"
    r"); (?P<skipped>\d+) skipped.*"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_checkpoint):
    """34 planned utterances (2 unusable) over about 20 shards, and one job's cache of them."""
    folder = tmp_path_factory.mktemp("concurrent")
    corpus = folder / "corpus"
    rows = good_rows(corpus, n_speakers=4, per_speaker=8, seed=1)
    (corpus / "text.wav").write_text("not audio")
    write_csv(corpus, rows + [("text.wav", "sad", "spk2"), ("missing.wav", "happy", "spk1")])
    job = start(extract_args(corpus, tiny_checkpoint, folder / "reference", *RUN_ARGS), folder / "reference.log")
    watch([job], folder)
    assert job.exitcode == 0, (folder / "reference.log").read_text()
    reference = snapshot(folder / "reference")
    assert len(reference["plan"]) >= 15
    return corpus, reference


def start(args: list[str], log: Path):
    """`ser-cache ARGS` in a child process with one thread, output to LOG."""
    proc = forkserver().Process(target=_job, args=([str(a) for a in args], str(log)), daemon=True)
    proc.start()
    return proc


def _job(args: list[str], log: str) -> None:
    # Notes when the job starts to look at the cache for its last line (CLOCK_MONOTONIC is one
    # clock for all processes): a writer it names must have been alive at that moment.
    from ser_cache import extract

    real = extract.final_state

    def final_state(*a, **kw):
        Path(log).with_suffix(".looked").write_text(repr(time.monotonic()))
        return real(*a, **kw)

    extract.final_state = final_state
    _cli_in_child(args, log, 1)


def looked(log: Path) -> float:
    return float(log.with_suffix(".looked").read_text())


def watch(procs: list, out: Path, kill=None, timeout: float = 90.0) -> tuple[list[float], bool]:
    """Wait for every process; with kill=(i, condition), SIGKILL procs[i] once condition(out)
    holds. Returns when each process was seen to end (monotonic s) and whether the kill was sent."""
    ended: dict[int, float] = {}
    fired = False
    deadline = time.monotonic() + timeout
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if i in ended:
                continue
            if not p.is_alive():
                ended[i] = time.monotonic()
            elif kill and kill[0] == i and not fired and kill[1](out):
                os.kill(p.pid, signal.SIGKILL)
                fired = True
        time.sleep(0.002)
    for p in procs:
        if p.is_alive():
            p.kill()
            raise TimeoutError(f"an extract job still ran after {timeout} s")
        p.join()
    return [ended[i] for i in range(len(procs))], fired


def last_line(output: str) -> re.Match:
    line = output.strip().splitlines()[-1].removeprefix("Error: ")
    m = LAST_LINE.fullmatch(line)
    assert m, f"unexpected last line: {line!r}"
    return m


def written_now(output: str) -> int:
    return int(re.search(r"shards: (\d+) written now", output).group(1))


def assert_truthful(line: re.Match, i: int, looked: float, ended: list[float], n: int, sharded: bool):
    """Job i's last line adds up, and names writers only while another job was still running."""
    assert not line["missing"], line.group(0)
    if line["complete"]:
        return
    writing, others = int(line["writing"] or 0), int(line["others"] or 0)
    assert int(line["done"]) + writing + others == n == int(line["n"]), line.group(0)
    assert sharded or not others, "a job without --shard left shards to no one"
    assert not writing or any(t >= looked for j, t in enumerate(ended) if j != i), \
        f"{line.group(0)!r}, but every other job had ended before it looked"


def assert_tidy(out: Path, n: int):
    """Every planned shard exactly once, with its sidecar, and nothing else left in the folder."""
    names = sorted(p.name for p in (out / C.SHARD_DIR).iterdir())
    assert names == sorted(f"{C.shard_name(k)}{ext}" for k in range(n) for ext in (".h5", ".json")), names
    assert not (out / CREATE_LOCK).exists()


def test_jobs_started_together_share_the_shards(corpus, tiny_checkpoint, tmp_path):
    source, reference = corpus
    n = len(reference["plan"])
    out = tmp_path / "cache"  # does not exist yet: the jobs also race to create it
    parts = [(), (), (), ("--shard", "0/2"), ("--shard", "1/2")]
    logs = [tmp_path / f"job{i}.log" for i in range(len(parts))]
    procs = [start(extract_args(source, tiny_checkpoint, out, *RUN_ARGS, *part), log) for part, log in zip(parts, logs)]
    ended, _ = watch(procs, out)

    outputs = [log.read_text() for log in logs]
    for proc, output in zip(procs, outputs):
        assert proc.exitcode == 0, output
    assert sum(map(written_now, outputs)) == n, "a shard was written by two jobs, or by none"
    lines = [last_line(output) for output in outputs]
    for i, (part, line) in enumerate(zip(parts, lines)):
        assert line["out"] == str(out) and (line["skipped"] == "2" or not line["complete"])  # counted in complete shards
        assert_truthful(line, i, looked(logs[i]), ended, n, sharded=bool(part))
    # A job looks only after letting go of all its claims: when the last one looks, none is held.
    last = max(range(len(procs)), key=lambda i: looked(logs[i]))
    assert lines[last]["complete"], f"the last job to look says {lines[last].group(0)!r}"
    assert_same_cache(out, reference)
    assert_tidy(out, n)


def test_a_writer_killed_at_a_random_point_blocks_nothing(corpus, tiny_checkpoint, tmp_path):
    source, reference = corpus
    n = len(reference["plan"])
    out = tmp_path / "cache"
    args = extract_args(source, tiny_checkpoint, out, *RUN_ARGS)
    logs = [tmp_path / f"job{i}.log" for i in range(3)]
    victim = start(args, logs[0])

    def writing(out: Path) -> bool:  # the victim has a temporary shard of its own
        return (out / C.SHARD_DIR).is_dir() and any((out / C.SHARD_DIR).glob(f"*.h5.*-{victim.pid}.tmp"))

    # The others start once the victim is writing, so that it holds claims they must respect;
    # it dies at a random moment after that, in a write or between two.
    deadline = time.monotonic() + 30
    while not writing(out) and victim.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    # Within 0.1 s of its first write: alone on an idle machine the victim writes its shards of
    # this corpus in about 0.3 s (with the others sharing them), so a later point can miss it.
    delay = random.Random(SEED).uniform(0.0, 0.1)
    procs = [victim] + [start(args, log) for log in logs[1:]]
    ended, fired = watch(procs, out, kill=(0, After(writing, delay)))

    assert fired, f"the victim ended before its kill point ({delay:.3f} s):\n{logs[0].read_text()}"
    assert victim.exitcode == -signal.SIGKILL
    for i in (1, 2):
        output = logs[i].read_text()
        assert procs[i].exitcode == 0, output
        assert_truthful(last_line(output), i, looked(logs[i]), ended, n, sharded=False)
    rerun = start(args, tmp_path / "rerun.log")  # the victim's claims died with it
    watch([rerun], out)
    output = (tmp_path / "rerun.log").read_text()
    assert rerun.exitcode == 0 and last_line(output)["complete"], output
    assert_same_cache(out, reference)
    assert_tidy(out, n)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_a_claim_held_by_a_live_job_is_left_alone_and_reported(corpus, tiny_checkpoint, tmp_path):
    source, reference = corpus
    n, n_odd = len(reference["plan"]), len(reference["plan"]) // 2
    out = tmp_path / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of the one-thread reference, so shards compare exactly
    try:
        result = cli(*extract_args(source, tiny_checkpoint, out, *RUN_ARGS, "--shard", "0/2"))
        line = last_line(result.output)  # the odd shards are the other part's to write: no failure
        assert result.exit_code == 0 and (line["done"], line["others"]) == (str(n - n_odd), str(n_odd)), result.output

        held = C.ShardClaims(out / C.SHARD_DIR)  # as if another live job were writing shard 1
        assert held.take(1)
        in_progress = out / C.SHARD_DIR / f"{C.shard_name(1)}.h5.otherhost-1.tmp"
        in_progress.write_bytes(b"being written")
        result = cli(*extract_args(source, tiny_checkpoint, out, *RUN_ARGS))
        assert result.exit_code == 0, result.output
        assert f"{n_odd - 1} written now" in result.output and "1 taken by other jobs meanwhile" in result.output
        line = last_line(result.output)
        assert (line["done"], line["writing"], line["missing"]) == (str(n - 1), "1", None), result.output
        assert in_progress.exists(), "a live job's temporary shard was removed"

        held.release(1)  # that job died: a re-run takes the shard over, and its leftovers
        result = cli(*extract_args(source, tiny_checkpoint, out, *RUN_ARGS))
        assert result.exit_code == 0 and "1 written now" in result.output and last_line(result.output)["complete"]
        assert_same_cache(out, reference)
        assert_tidy(out, n)
    finally:
        torch.set_num_threads(threads)

    open_cache(out).shard_path(3).unlink()  # nobody holds it: a job's own part is not done
    assert final_state(open_cache(out), (0, 1)) == (f"{n - 1} of {n} shards complete; 1 shard missing (re-run to finish)", False)
    assert final_state(open_cache(out), (0, 2)) == (
        f"{n - 1} of {n} shards complete; 1 shard of other --shard parts missing "
        "(run those jobs, or this command without --shard, to finish)", True)


def test_a_shard_whose_holder_dies_after_the_last_look_is_taken_over(corpus, tiny_checkpoint, tmp_path, monkeypatch):
    """The window CI once hit: a job sees a shard of its part held by another job, ends its
    passes, and that job dies before the final look; the shard is then missing and unheld.
    The job takes it over instead of failing with "re-run to finish"."""
    import ser_cache.extract as E

    source, reference = corpus
    n = len(reference["plan"])
    out = tmp_path / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of the one-thread reference, so shards compare exactly
    try:
        assert cli(*extract_args(source, tiny_checkpoint, out, *RUN_ARGS)).exit_code == 0
        open_cache(out).shard_path(2).unlink()
        held = C.ShardClaims(out / C.SHARD_DIR)  # another live job is writing shard 2 ...
        assert held.take(2)
        looks = []

        def holder_dies_first(cache, shard):  # ... and dies just before this job's final look
            if not looks:
                held.release(2)
            looks.append(shard)
            return final_state(cache, shard)

        monkeypatch.setattr(E, "final_state", holder_dies_first)
        result = cli(*extract_args(source, tiny_checkpoint, out, *RUN_ARGS))
        assert result.exit_code == 0, result.output
        assert "1 shard missing (re-run to finish): a job that held them has ended; taking them over" in result.output
        assert "1 taken by other jobs meanwhile" in result.output and "1 written now" in result.output
        assert len(looks) == 2 and last_line(result.output)["complete"]
        assert_same_cache(out, reference)
        assert_tidy(out, n)
    finally:
        torch.set_num_threads(threads)
