"""Fault injection on the `ser-cache extract / inspect / verify` commands.

Bad audio is skipped with its reason, recorded in the cache, counted and shown; bad metadata
is refused before any model is loaded; a run killed (SIGKILL) or interrupted (SIGINT) at any
point and then re-run gives exactly the cache of an uninterrupted run; a failing disk leaves
no shard that passes for complete; a damaged shard is named by `verify`, refused by the cheap
`Cache.check`, and re-created alone by `extract --repair`.

Everything runs on synthetic audio and the tiny random checkpoint of conftest.py, with small
shards (`--shard-mb`) so that a corpus of a few dozen utterances spans many shards.
"""
from __future__ import annotations

import csv
import errno
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from ser_cache import audio, cache as C, encoder
from ser_cache.cache import CacheError, open_cache, shard_name
from ser_cache.cli import main
from ser_cache.locks import CREATE_LOCK

from conftest import tone, write_corpus

SEED = int(os.environ.get("SER_CACHE_FAULT_SEED", "1234"))  # the random kill points and byte flips
SHARD_MB = "0.02"  # about 20 KB: one to three utterances per shard in short mode


# --- corpora -------------------------------------------------------------------------------------


def write_csv(folder: Path, rows: list[tuple[str, str, str]], header=("path", "label", "speaker")) -> Path:
    path = folder / "utterances.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def good_rows(folder: Path, n_speakers: int = 4, per_speaker: int = 3, seed: int = 0) -> list[tuple[str, str, str]]:
    records = write_corpus(folder, n_speakers=n_speakers, per_speaker=per_speaker, seed=seed)
    return [(Path(r.path).name, r.label, r.speaker) for r in records]


def _wav_bytes(seconds=0.5, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, tone(seconds, **kw), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _with(samples, subtype, rate=16000):
    return lambda p: sf.write(p, samples, rate, subtype=subtype)


def _nan():
    x = tone(0.5)
    x[100] = np.nan
    return x


def _inf():
    x = tone(0.5)
    x[100:103] = np.inf
    return x


# file name -> (how to make it, or None for a file that is not there; words of the recorded reason)
BAD_FILES = {
    "missing.wav": (None, "file not found"),
    "zero bytes.wav": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "text.wav": (lambda p: p.write_text("id,label\n1,angry\n"), "not a readable audio file"),
    "random.wav": (lambda p: p.write_bytes(np.random.default_rng(3).bytes(6000)), "not a readable audio file"),
    "cut header.wav": (lambda p: p.write_bytes(_wav_bytes()[:30]), "not a readable audio file"),
    "cut data.wav": (lambda p: p.write_bytes(_wav_bytes()[:5000]), "truncated: the header declares 0.50 s"),
    "no samples.wav": (_with(np.zeros((0, 1), np.float32), "PCM_16"), "no samples"),
    "too short.wav": (_with(tone(0.005), "PCM_16"), "shorter than one 20 ms encoder frame"),
    "nan.wav": (_with(_nan(), "FLOAT"), "1 NaN or infinite samples"),
    "inf.wav": (_with(_inf(), "DOUBLE"), "3 NaN or infinite samples"),
    "long.wav": (_with(tone(31.0), "PCM_16"), "longer than 30 s (31.0 s): pass --long-audio"),
    "locked.wav": (_with(tone(0.5), "PCM_16"), "permission denied: make the file readable"),
}
# usable files with something unusual: (how to make it, note recorded or "")
ODD_FILES = {
    "silence.wav": (_with(np.zeros((8000, 1), np.float32), "PCM_16"), "digital silence (every sample is zero)"),
    "8 channels 96k.wav": (_with(tone(0.6, rate=96000, channels=8), "PCM_24", 96000), ""),
    "stereo 44k.flac": (_with(tone(0.4, rate=44100, channels=2), "PCM_16", 44100), ""),
    "mono 8k.wav": (_with(tone(0.7, rate=8000), "PCM_16", 8000), ""),
    "dossier à espaces/émotion fâchée ñ 音声.wav": (_with(tone(0.5, freq=300), "PCM_16"), ""),
}


def uid(name: str) -> str:
    return os.path.splitext(name)[0]


def bad_corpus(folder: Path, monkeypatch) -> tuple[list[tuple], dict]:
    """Good files of 4 speakers plus every bad and odd file; returns (rows, {bad id: reason words})."""
    rows = good_rows(folder)
    labels = ["angry", "happy", "sad"]
    for i, (name, (make, _)) in enumerate({**BAD_FILES, **ODD_FILES}.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if make:
            make(path)
        rows.append((name, labels[i % 3], f"spk{i % 4}"))
    locked = folder / "locked.wav"
    if os.geteuid() == 0:  # root reads a chmod 000 file: refuse access to it as a user would be refused
        real = os.access
        monkeypatch.setattr(audio.os, "access", lambda p, m, **kw: False if Path(p) == locked.resolve() else real(p, m, **kw))
    else:
        locked.chmod(0)
    write_csv(folder, rows)
    return rows, {uid(n): words for n, (_, words) in BAD_FILES.items()}


# --- running the CLI -----------------------------------------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def extract_args(corpus: Path, checkpoint: Path, out: Path, *extra) -> list[str]:
    return ["extract", str(corpus), "--corpus", "csv", "--model", str(checkpoint), "--out", str(out),
            "--device", "cpu", "--mode", "short", "--shard-mb", SHARD_MB, *extra]


def snapshot(out: Path) -> dict:
    """Everything a cache holds that a user can see, per layer, for exact comparison."""
    cache = open_cache(out)
    cache.check()
    layers = {s: cache.read_layer(s) for s in cache.layers}
    return {
        "plan": cache.plan,
        "ids": {s: list(d.ids) for s, d in layers.items()},
        "labels": {s: list(d.labels) for s, d in layers.items()},
        "offsets": {s: d.offsets for s, d in layers.items()},
        "frames": {s: d.frames for s, d in layers.items()},
        "skipped": sorted(cache.skipped(), key=lambda s: s["id"]),
        "notes": sorted(cache.notes(), key=lambda n: n["id"]),
    }


def assert_same_cache(out: Path, reference: dict):
    got = snapshot(out)
    assert got["plan"] == reference["plan"]
    assert got["skipped"] == reference["skipped"] and got["notes"] == reference["notes"]
    for s in reference["frames"]:
        assert got["ids"][s] == reference["ids"][s], f"layer {s}: ids differ"
        assert got["labels"][s] == reference["labels"][s]
        np.testing.assert_array_equal(got["offsets"][s], reference["offsets"][s])
        np.testing.assert_array_equal(got["frames"][s], reference["frames"][s], err_msg=f"layer {s}")
    assert open_cache(out).verify() == {}
    leftovers = [p.name for p in (out / C.SHARD_DIR).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


# --- bad audio: skipped, recorded, counted, shown ------------------------------------------------


def test_every_bad_file_is_skipped_recorded_counted_and_inspected(tmp_path, tiny_checkpoint, monkeypatch):
    corpus, out = tmp_path / "corpus", tmp_path / "cache"
    rows, bad = bad_corpus(corpus, monkeypatch)
    result = cli(*extract_args(corpus, tiny_checkpoint, out))
    assert result.exit_code == 0, result.output
    n_bad = len(bad)

    # the final summary names every skipped utterance with its reason, and the progress counts them
    assert f"skipped: {n_bad} utterances" in result.output
    for i, words in bad.items():
        assert any(line.strip().startswith(f"{i}: ") and words in line for line in result.output.splitlines()), (i, words)
    assert f"skipped={n_bad}" in result.stderr  # the progress bar's counter
    assert f"{n_bad} skipped" in result.stdout.splitlines()[-1]  # the cache-wide count, last line

    # the cache records them: id, path, reason
    cache = open_cache(out)
    assert cache.complete and len(cache.plan) > 3
    skipped = {s["id"]: s for s in cache.skipped()}
    assert sorted(skipped) == sorted(bad)
    for i, words in bad.items():
        assert words in skipped[i]["reason"]
        assert skipped[i]["path"] == str((corpus / f"{i}.wav").resolve())
    notes = {n["id"]: n["note"] for n in cache.notes()}
    assert notes == {uid(n): note for n, (_, note) in ODD_FILES.items() if note}

    # everything else is there, odd files and odd names included, in id order
    kept = sorted(uid(r[0]) for r in rows if uid(r[0]) not in bad)
    layer = cache.read_layer(cache.layers[-1])
    assert list(layer.ids) == kept
    assert len(layer.ids) + len(skipped) == len(rows)
    odd = list(layer.ids).index("dossier à espaces/émotion fâchée ñ 音声")
    assert layer.n_frames[odd] == 25  # 0.5 s at one frame per 20 ms

    # `inspect` shows them, as text and as JSON
    shown = cli("inspect", out)
    assert shown.exit_code == 0 and f"skipped {n_bad}" in shown.output
    for i, words in bad.items():
        assert f"{i}: " in shown.output and words in shown.output
    as_json = json.loads(cli("inspect", out, "--json").output)
    assert sorted(as_json["skipped"], key=lambda s: s["id"]) == sorted(skipped.values(), key=lambda s: s["id"])


@pytest.mark.parametrize("policy,frames,note", [
    ("refuse", None, None),
    ("truncate", 1500, "truncated from 31.0 s to 30 s"),
    ("windows", 1550, "31.0 s encoded as 2 windows of up to 30 s"),
])
def test_long_audio_policy(tmp_path, tiny_checkpoint, policy, frames, note):
    corpus, out = tmp_path / "corpus", tmp_path / "cache"
    rows = good_rows(corpus, per_speaker=2)
    sf.write(corpus / "long.wav", tone(31.0), 16000)
    write_csv(corpus, rows + [("long.wav", "sad", "spk0")])
    result = cli(*extract_args(corpus, tiny_checkpoint, out, "--long-audio", policy, "--layers", "0"))
    assert result.exit_code == 0, result.output
    cache = open_cache(out)
    meta = cache.read_meta()
    if frames is None:
        assert [s["id"] for s in cache.skipped()] == ["long"] and "long" not in meta["ids"]
        assert "--long-audio windows" in cache.skipped()[0]["reason"]
    else:
        assert cache.skipped() == []
        assert meta["n_frames"][list(meta["ids"]).index("long")] == frames
        assert {"id": "long", "note": note} in cache.notes()


def test_strict_fails_on_a_bad_file_and_on_a_cache_with_skips(tmp_path, tiny_checkpoint):
    corpus, out = tmp_path / "corpus", tmp_path / "cache"
    rows = good_rows(corpus)
    (corpus / "text.wav").write_text("not audio")
    write_csv(corpus, rows + [("text.wav", "sad", "spk1")])

    strict = cli(*extract_args(corpus, tiny_checkpoint, out, "--strict"))
    assert strict.exit_code != 0
    assert "text.wav: not a readable audio file" in strict.output and "--strict" in strict.output

    lenient = cli(*extract_args(corpus, tiny_checkpoint, out))  # resumes the same cache
    assert lenient.exit_code == 0, lenient.output
    assert [s["id"] for s in open_cache(out).skipped()] == ["text"]

    again = cli(*extract_args(corpus, tiny_checkpoint, out, "--strict"))  # nothing left to encode
    assert again.exit_code != 0
    assert "--strict" in again.output and "text" in again.output


# --- bad metadata: refused before any model is loaded --------------------------------------------


CSV_CASES = {
    "duplicate path": ("path,label,speaker\na.wav,angry,s1\nb.wav,sad,s2\na.wav,angry,s1\n", r"utterances.csv, rows 2 and 4 have the same id 'a'"),
    "duplicate id": ("id,path,label,speaker\nu1,a.wav,angry,s1\nu1,b.wav,sad,s2\n", r"utterances.csv, rows 2 and 3 have the same id 'u1'"),
    "empty field": ("path,label,speaker\na.wav,angry,s1\nb.wav,,s2\n", r"utterances.csv, row 3: the label field is empty: fill it in"),
    "short row": ("path,label,speaker\na.wav,angry,s1\nb.wav,sad\n", r"utterances.csv, row 3: the speaker field is empty"),
    "long row": ("path,label,speaker\na.wav,angry,s1,x\n", r"utterances.csv, row 2: 4 fields but the header names 3: quote"),
    "no speaker column": ("path,label\na.wav,angry\n", r"utterances.csv, row 1: missing column\(s\) speaker"),
    "outside folder": ("path,label,speaker\na.wav,angry,s1\n../../etc/passwd,sad,s2\n", r"utterances.csv, row 3: path '../../etc/passwd' points outside.*put the audio under"),
    "header only": ("path,label,speaker\n", r"has a header but no rows: add one row per utterance"),
    "empty csv": ("", r"utterances.csv, row 1: missing column\(s\) path, label, speaker"),
}


@pytest.fixture()
def no_model(monkeypatch):
    """Fail loudly if the command gets as far as loading a model."""
    def load_encoder(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(encoder, "load_encoder", load_encoder)


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_bad_metadata_is_refused_before_the_model_loads(tmp_path, no_model, case):
    text, message = CSV_CASES[case]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in "abcd":
        sf.write(corpus / f"{name}.wav", tone(0.3), 16000)
    (corpus / "utterances.csv").write_text(text, encoding="utf-8")
    result = cli(*extract_args(corpus, "unused.pt", tmp_path / "cache"))
    assert result.exit_code == 1
    error = result.output.split("Error: ", 1)[-1]
    assert re.search(message, error, re.S), result.output
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args,message", [
    ((), r"CSV file .*utterances.csv does not exist: pass --csv PATH"),
    (("--label-map", "emo5"), r"unknown label map 'emo5'; known label maps: .*'none'"),
])
def test_no_csv_and_unknown_label_map(tmp_path, no_model, args, message):
    (tmp_path / "corpus").mkdir()
    if args:
        write_csv(tmp_path / "corpus", [("a.wav", "angry", "s1")])
    result = cli(*extract_args(tmp_path / "corpus", "unused.pt", tmp_path / "cache", *args))
    assert result.exit_code == 1
    assert re.search(message, result.output), result.output


def test_a_csv_file_is_accepted_as_data_dir(tmp_path, tiny_checkpoint):
    corpus = tmp_path / "corpus"
    rows = good_rows(corpus)
    listing = write_csv(corpus, rows).rename(corpus / "my.csv")  # no utterances.csv to fall back on
    result = cli(*extract_args(listing, tiny_checkpoint, tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    cache = open_cache(tmp_path / "cache")
    # audio paths are relative to the CSV's folder, not to the working directory
    assert {Path(r.path) for r in cache.records()} == {(corpus / name).resolve() for name, _, _ in rows}
    assert len(cache.read_meta()["ids"]) == len(rows) and not cache.skipped()


@pytest.mark.parametrize("corpus,extra,message", [
    ("ravdess", (), r"is a file, but --corpus ravdess reads a corpus folder: pass the folder, or --corpus csv"),
    ("csv", ("--csv",), r"is already the CSV: drop --csv"),
])
def test_a_file_as_data_dir_is_refused_where_it_cannot_be_the_csv(tmp_path, no_model, corpus, extra, message):
    listing = write_csv(tmp_path, good_rows(tmp_path))
    args = ["extract", listing, "--corpus", corpus, "--model", "unused.pt", "--out", tmp_path / "cache",
            *(a for e in extra for a in (e, listing))]
    result = cli(*args)
    assert result.exit_code == 2 and "DATA_DIR" in result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "cache").exists()


def test_labels_with_one_speaker_are_extracted_with_a_warning_and_refused_by_training(tmp_path, tiny_checkpoint):
    corpus = tmp_path / "corpus"
    rows = good_rows(corpus, n_speakers=1, per_speaker=3)  # one actor's recordings: angry, happy, sad
    write_csv(corpus, rows)
    result = cli(*extract_args(corpus, tiny_checkpoint, tmp_path / "cache", "--limit", "2"))
    assert result.exit_code == 0, result.output
    for label in ("angry", "happy", "sad"):  # named once, by the summary, though --limit re-checks
        assert result.output.count(f"warning: label '{label}' has only speaker 'spk0'") == 1, result.output
    assert "extraction goes on" in result.output and open_cache(tmp_path / "cache").complete

    result = cli("train", tmp_path / "cache", "--layer", "1", "--head", "mean", "--out", tmp_path / "run",
                 "--device", "cpu")
    assert result.exit_code == 1
    assert re.search(r"Error: every utterance is from speaker 'spk0': speaker-independent folds .*"
                     r"train on a cache of a corpus with more speakers", result.output), result.output
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unknown_labels_of_a_label_map_are_counted_or_refused(tmp_path, no_model):
    corpus = tmp_path / "corpus"
    rows = good_rows(corpus)  # angry, happy, sad from 4 speakers
    shutil.copy(corpus / rows[0][0], corpus / "typo.wav")
    write_csv(corpus, rows + [("typo.wav", "angy", "spk3")])
    # one misspelt label among known ones: dropped and counted before the model loads, never silently
    result = CliRunner().invoke(main, extract_args(corpus, "unused.pt", tmp_path / "cache", "--label-map", "shemo4"))
    assert isinstance(result.exception, AssertionError)  # not refused: it went on to load the model
    assert "dropped 1 utterances whose original label is not in label map shemo4: angy 1" in result.output
    # labels the map does not know at all: refused
    write_csv(corpus, [(p, "colère", spk) for p, _, spk in rows])
    result = cli(*extract_args(corpus, "unused.pt", tmp_path / "cache", "--label-map", "shemo4"))
    assert result.exit_code == 1 and "label map 'shemo4' keeps none of the" in result.output


# --- interruptions: killed at any point, re-run, same cache --------------------------------------


# Batches of several utterances, so that a batch could straddle two shards; float32, so that no
# difference in the arithmetic hides in float16 rounding.
RUN_ARGS = ("--batch-size", "4", "--dtype", "float32")


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory, tiny_checkpoint):
    """A corpus of 34 planned utterances (2 bad) over many shards, and its uninterrupted cache."""
    forkserver()
    multiprocessing.forkserver.ensure_running()  # imports torch in the background meanwhile
    folder = tmp_path_factory.mktemp("kill")
    corpus = folder / "corpus"
    rows = good_rows(corpus, n_speakers=4, per_speaker=8, seed=1)
    (corpus / "text.wav").write_text("not audio")
    write_csv(corpus, rows + [("text.wav", "sad", "spk2"), ("missing.wav", "happy", "spk1")])
    result = cli(*extract_args(corpus, tiny_checkpoint, folder / "reference", *RUN_ARGS))
    assert result.exit_code == 0, result.output
    reference = snapshot(folder / "reference")
    assert len(reference["plan"]) >= 15 and len(reference["skipped"]) == 2
    return corpus, reference, folder / "reference"


def _cli_in_child(args: list[str], log: str, threads: int) -> None:
    """Body of a child process: `ser-cache ARGS`, output to LOG; exits with the CLI's status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(threads)  # the arithmetic of this process, so shards compare exactly
    # A terminal's Ctrl-C: Python installs this handler only if SIGINT was not ignored when it
    # started, and a test run launched in the background (`cmd &` in a script) ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main(args=args, prog_name="ser-cache")


def forkserver():
    """The multiprocessing context whose server process has imported torch, Whisper and this module."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["ser_cache.cli", "ser_cache.extract", "whisper", __name__])
    return ctx


def spawn(args: list[str], log: Path):
    """Start `ser-cache ARGS` in a separate process that can be killed like any other.

    The processes are forked from a server that has imported torch and Whisper once (a fresh
    interpreter spends seconds on that import), so many kill points stay cheap.
    """
    proc = forkserver().Process(target=_cli_in_child, args=(args, str(log), torch.get_num_threads()), daemon=True)
    proc.start()
    return proc


def shards_written(out: Path) -> int:
    return len(list((out / C.SHARD_DIR).glob("*.h5"))) if (out / C.SHARD_DIR).is_dir() else 0


def tmp_shard_present(out: Path) -> bool:
    return (out / C.SHARD_DIR).is_dir() and any((out / C.SHARD_DIR).glob("*.h5*.tmp"))


class After:
    """A kill condition: `delay` seconds after `ready(out)` first holds."""

    def __init__(self, ready, delay: float = 0.0):
        self.ready, self.delay, self.since = ready, delay, None

    def __call__(self, out: Path) -> bool:
        if self.since is None and self.ready(out):
            self.since = time.monotonic()
        return self.since is not None and time.monotonic() - self.since >= self.delay


def kill_when(jobs: list[dict], timeout: float = 60.0) -> None:
    """Poll every job's cache folder; send its signal as soon as its condition holds."""
    deadline = time.monotonic() + timeout
    pending = list(jobs)
    while pending and time.monotonic() < deadline:
        for job in list(pending):
            if not job["proc"].is_alive():  # ended before its kill point: reported by the test
                pending.remove(job)
            elif job["when"](job["out"]):
                os.kill(job["proc"].pid, job["signal"])
                job["fired"] = True
                pending.remove(job)
        time.sleep(0.002)
    for job in jobs:
        job["proc"].join(timeout=max(1.0, deadline - time.monotonic()))
        if job["proc"].is_alive():
            job["proc"].kill()
            raise TimeoutError(f"{job['name']}: still running after {timeout} s")


def test_kill_and_interrupt_at_random_points_then_resume(kill_corpus, tiny_checkpoint, tmp_path):
    corpus, reference, _ = kill_corpus
    n = len(reference["plan"])
    rng = random.Random(SEED)
    points = [
        ("SIGKILL while the first shard is being written", signal.SIGKILL, After(tmp_shard_present)),
        *[(f"SIGKILL once {k} shards are written", signal.SIGKILL, After(lambda out, k=k: shards_written(out) >= k))
          for k in sorted(rng.sample(range(1, n - 4), 2))],
        *[(f"SIGKILL {d:.3f} s after the cache folder was created", signal.SIGKILL,
           After(lambda out: (out / C.SETTINGS_FILE).exists(), d)) for d in [rng.uniform(0.0, 0.15)]],
        *[(f"SIGINT once {k} shards are written", signal.SIGINT, After(lambda out, k=k: shards_written(out) >= k))
          for k in [rng.randrange(1, n - 4)]],
    ]
    jobs = []
    for i, (name, sig, when) in enumerate(points):
        out = tmp_path / f"cache{i}"
        args = extract_args(corpus, tiny_checkpoint, out, *RUN_ARGS)
        jobs.append({"name": name, "signal": sig, "when": when, "out": out, "args": args,
                     "log": tmp_path / f"log{i}.txt", "fired": False})
        jobs[-1]["proc"] = spawn(args, jobs[-1]["log"])
    kill_when(jobs)

    # one run is killed twice: resumed in a new process, then killed again further on
    twice = jobs[1]  # the earlier of the two "once k shards" kills
    assert twice["fired"] and twice["signal"] == signal.SIGKILL
    k2 = rng.randrange(min(shards_written(twice["out"]) + 2, n - 2), n - 1)
    twice.update(name=f"{twice['name']}, then again once {k2} are", when=After(lambda out: shards_written(out) >= k2),
                 fired=False, proc=spawn(twice["args"], twice["log"]))
    kill_when([twice])

    for job in jobs:
        out, log = job["out"], job["log"].read_text()
        assert job["fired"], f"{job['name']}: the run ended before the kill point (seed {SEED}):\n{log}"
        before = shards_written(out)
        assert before < n, f"{job['name']}: every shard was written before the signal arrived"
        if job["signal"] == signal.SIGINT:
            assert job["proc"].exitcode == 1, log
            assert "interrupted; every shard written so far is complete. Re-run the same command to resume" in log
            assert not tmp_shard_present(out)  # Ctrl-C lets the shard being written finish or vanish
            assert all(why == "missing" for why in open_cache(out).verify().values())
        else:
            assert job["proc"].exitcode == -signal.SIGKILL
        resumed = cli(*job["args"])
        assert resumed.exit_code == 0, f"{job['name']}: {resumed.output}"
        assert f"{before} already complete" in resumed.output
        assert_same_cache(out, reference)


def test_crash_while_the_cache_folder_was_created(kill_corpus, tiny_checkpoint, tmp_path):
    """Killed after records or plan were written but before cache.json: not a foreign folder."""
    corpus, reference, _ = kill_corpus
    out = tmp_path / "cache"
    (out / C.SHARD_DIR).mkdir(parents=True)
    (out / C.RECORDS_FILE).write_text('{"id": "half a li')
    (out / f"{C.PLAN_FILE}.4242.tmp").write_text("[[")
    (out / CREATE_LOCK).write_text("")  # its creation lock, no longer held by anyone
    result = cli(*extract_args(corpus, tiny_checkpoint, out, *RUN_ARGS))
    assert result.exit_code == 0, result.output
    assert_same_cache(out, reference)

    foreign = tmp_path / "mine"  # a folder with anything else in it is still refused
    foreign.mkdir()
    (foreign / C.RECORDS_FILE).write_text("")
    (foreign / "thesis.tex").write_text("")
    result = cli(*extract_args(corpus, tiny_checkpoint, foreign, *RUN_ARGS))
    assert result.exit_code == 1 and "is not empty and is not a cache" in result.output
    assert (foreign / "thesis.tex").exists()


def test_crash_between_the_checksum_file_and_the_rename(kill_corpus, tiny_checkpoint, tmp_path):
    """The states a kill can leave inside shards/: a finished .h5.tmp whose sidecar exists but
    which was never renamed, and a half-written sidecar. Both shards are re-done, nothing else."""
    corpus, reference, reference_dir = kill_corpus
    out = tmp_path / "cache"
    shutil.copytree(reference_dir, out)
    shards = out / C.SHARD_DIR
    (shards / "shard-00002.h5").rename(shards / "shard-00002.h5.tmp")
    (shards / "shard-00005.h5").unlink()
    (shards / "shard-00005.json.4242.tmp").write_text('{"shard": 5, "sha2')
    untouched = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.h5")}
    result = cli(*extract_args(corpus, tiny_checkpoint, out, *RUN_ARGS))
    assert result.exit_code == 0, result.output
    assert f"2 written now, {len(reference['plan']) - 2} already complete" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.h5") if p.name in untouched} == untouched
    assert_same_cache(out, reference)


# --- write failures: a clear error, and no partial shard taken as complete -----------------------


FAIL_AT = 3  # the shard whose writing fails


def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["dataset write", "fsync", "checksum file"])
def test_disk_full_is_a_clear_error_and_no_partial_shard_counts(kill_corpus, tiny_checkpoint, tmp_path, monkeypatch, where):
    corpus, reference, _ = kill_corpus
    out = tmp_path / "cache"
    failing = shard_name(FAIL_AT)
    real_write_at, real_fsync, real_dump = C._write_at, C._fsync, json.dump
    if where == "dataset write":  # a full disk fails the write of states into the shard's file
        monkeypatch.setattr(C, "_write_at", lambda fd, data, offset: _enospc()
                            if failing in os.readlink(f"/proc/self/fd/{fd}") else real_write_at(fd, data, offset))
    elif where == "fsync":
        monkeypatch.setattr(C, "_fsync", lambda path: _enospc() if failing in str(path) else real_fsync(path))
    else:  # the sidecar's temporary file is created, then the disk fills up
        monkeypatch.setattr(C.json, "dump", lambda obj, f, **kw: _enospc()
                            if isinstance(obj, dict) and obj.get("shard") == FAIL_AT else real_dump(obj, f, **kw))

    result = cli(*extract_args(corpus, tiny_checkpoint, out, *RUN_ARGS))
    assert result.exit_code == 1
    error = result.output.split("Error: ", 1)[-1]
    assert f"cannot write {shard_name(FAIL_AT)} in {out / C.SHARD_DIR}: No space left on device" in error
    assert "re-run the same command to resume" in error

    names = sorted(p.name for p in (out / C.SHARD_DIR).iterdir())
    assert f"{shard_name(FAIL_AT)}.h5" not in names and f"{shard_name(FAIL_AT)}.json" not in names
    assert [n for n in names if n.endswith(".tmp")] == []
    cache = open_cache(out)
    assert FAIL_AT not in cache.complete_shards() and set(range(FAIL_AT)) <= set(cache.complete_shards())
    problems = cache.verify()
    assert FAIL_AT in problems and set(problems.values()) == {"missing"}  # nothing half-written
    with pytest.raises(CacheError, match=f"{shard_name(FAIL_AT)}: missing"):
        cache.check()

    monkeypatch.undo()  # space freed: the same command finishes the job
    resumed = cli(*extract_args(corpus, tiny_checkpoint, out, *RUN_ARGS))
    assert resumed.exit_code == 0, resumed.output
    assert f"{FAIL_AT} already complete" in resumed.output or f"{len(cache.complete_shards())} already complete" in resumed.output
    assert_same_cache(out, reference)


# --- corruption: verify names it, check refuses it, --repair re-creates it alone ------------------


def verify_output(out: Path):
    result = CliRunner().invoke(main, ["verify", str(out)])
    named = [line.split(":")[0] for line in result.output.splitlines() if line.startswith("shard-")]
    return result, named


def test_verify_names_a_shard_with_flipped_bytes(kill_corpus, tmp_path):
    _, reference, reference_dir = kill_corpus
    out = tmp_path / "cache"
    shutil.copytree(reference_dir, out)
    rng = random.Random(SEED)
    k = rng.randrange(len(reference["plan"]))
    path = open_cache(out).shard_path(k)
    raw = path.read_bytes()
    positions = [0, 100, len(raw) // 2, len(raw) - 1, *rng.sample(range(len(raw)), 4)]
    for pos in positions:
        damaged = bytearray(raw)
        damaged[pos] ^= 1 << rng.randrange(8)  # one bit
        path.write_bytes(bytes(damaged))
        result, named = verify_output(out)
        assert result.exit_code == 1, f"flip at byte {pos} of {len(raw)} not caught (seed {SEED})"
        assert named == [shard_name(k)], result.output
        assert f"{shard_name(k)}: SHA-256 differs" in result.output
        assert "1 of" in result.output and "--repair" in result.output
    path.write_bytes(raw)
    result, named = verify_output(out)
    assert result.exit_code == 0 and named == [] and f"all {len(reference['plan'])} shards verified" in result.output


def test_truncated_and_altered_shards_are_refused_then_repaired_alone(kill_corpus, tiny_checkpoint, tmp_path):
    corpus, reference, reference_dir = kill_corpus
    out = tmp_path / "cache"
    shutil.copytree(reference_dir, out)
    cache = open_cache(out)
    cut, flipped, no_sidecar = 1, 4, 6
    path = cache.shard_path(cut)
    os.truncate(path, path.stat().st_size // 2)
    raw = bytearray(cache.shard_path(flipped).read_bytes())
    raw[len(raw) // 3] ^= 0x10
    cache.shard_path(flipped).write_bytes(bytes(raw))
    (cache.shard_dir / f"{shard_name(no_sidecar)}.json").unlink()

    # the cheap checks (run before any training) refuse the truncated shard and the lost sidecar
    with pytest.raises(CacheError) as e:
        cache.check()
    message = str(e.value)
    assert f"{shard_name(cut)}: size " in message and "truncated or altered" in message
    assert f"{shard_name(no_sidecar)}: its checksum file is missing" in message
    assert "--repair" in message and shard_name(flipped) not in message  # a flipped bit keeps the size
    with pytest.raises(CacheError):
        cache.read_layer(cache.layers[0])

    result, named = verify_output(out)
    assert result.exit_code == 1 and named == [shard_name(k) for k in sorted((cut, flipped, no_sidecar))]

    untouched = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.shard_dir.glob("*.h5")
                 if p.name not in {f"{shard_name(k)}.h5" for k in (cut, flipped, no_sidecar)}}
    repaired = cli(*extract_args(corpus, tiny_checkpoint, out, *RUN_ARGS, "--repair"))
    assert repaired.exit_code == 0, repaired.output
    assert f"damaged shards re-created: {[cut, flipped, no_sidecar]}" in repaired.output  # unverifiable = damaged
    assert f"3 written now, {len(reference['plan']) - 3} already complete" in repaired.output
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.shard_dir.glob("*.h5")
            if p.name in untouched} == untouched
    assert verify_output(out)[0].exit_code == 0
    assert_same_cache(out, reference)


def test_a_truncated_shard_is_redone_by_a_plain_rerun(kill_corpus, tiny_checkpoint, tmp_path):
    corpus, reference, reference_dir = kill_corpus
    out = tmp_path / "cache"
    shutil.copytree(reference_dir, out)
    path = open_cache(out).shard_path(0)
    os.truncate(path, 100)
    result = cli(*extract_args(corpus, tiny_checkpoint, out, *RUN_ARGS))
    assert result.exit_code == 0 and "1 written now" in result.output
    assert_same_cache(out, reference)


def test_inspect_and_read_layer_name_a_shard_hdf5_cannot_open(kill_corpus, tmp_path):
    _, reference, reference_dir = kill_corpus
    out = tmp_path / "cache"
    shutil.copytree(reference_dir, out)
    path = open_cache(out).shard_path(2)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF  # the HDF5 signature: same size, so only the full checks see it
    path.write_bytes(bytes(raw))
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 1  # an error message, not a traceback
    assert f"Error: {shard_name(2)} of {out} cannot be read" in result.output and "--repair" in result.output
    with pytest.raises(CacheError, match=f"{shard_name(2)}: unreadable"):
        open_cache(out).read_layer(0)  # refused by the cheap checks that training runs too


@pytest.mark.parametrize("name", [C.SETTINGS_FILE, C.PLAN_FILE])
def test_a_damaged_settings_or_plan_file_is_named(kill_corpus, tiny_checkpoint, tmp_path, name):
    corpus, _, reference_dir = kill_corpus
    out = tmp_path / "cache"
    shutil.copytree(reference_dir, out)
    text = (out / name).read_text()
    (out / name).write_text(text[: len(text) // 2])
    for args in (["verify", out], ["inspect", out], extract_args(corpus, tiny_checkpoint, out, *RUN_ARGS)):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 1 and not isinstance(result.exception, ValueError), result.output
        assert f"Error: {out}: {name} cannot be read" in result.output and "new --out folder" in result.output
