"""check-corpus: every planted problem is named on its own line, then counted; a clean corpus
passes. Also: inspect says where a cache's corpus came from."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import soundfile as sf
from click.testing import CliRunner

from ser_cache.cli import main
from ser_cache.corpuscheck import check_corpus

from conftest import tone, write_corpus


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def rows_of(records) -> list[dict]:
    return [{"file": r.path, "emotion": r.label, "spk": r.speaker} for r in records]


COLUMNS = "path=file,label=emotion,speaker=spk"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def clean(tmp_path) -> list[dict]:
    """Six speakers, each speaking every class: no problem for 5 folds."""
    return rows_of(write_corpus(tmp_path / "audio", n_speakers=6, per_speaker=3))


def test_a_clean_corpus_has_no_problems(tmp_path, clean):
    manifest = write_manifest(tmp_path / "corpus.csv", clean)
    result = cli("check-corpus", manifest, "--corpus", "csv", "--columns", COLUMNS, "--labels", "angry,happy,sad")
    assert result.exit_code == 0, result.output
    assert "speakers per class: angry 6, happy 6, sad 6" in result.output
    assert "folds: kfold, 5 folds, as train builds them" in result.output
    assert result.output.strip().endswith("no problems: ready to extract")


def test_each_planted_problem_is_one_line_and_counted(tmp_path, clean):
    audio = tmp_path / "audio"
    (audio / "garbage.wav").write_bytes(b"RIFF not really audio at all")
    sf.write(audio / "long.wav", tone(31.0), 16000)
    rows = clean + [
        {"file": str(audio / "gone.wav"), "emotion": "angry", "spk": "spk0"},  # missing
        {"file": str(audio / "garbage.wav"), "emotion": "angry", "spk": "spk1"},  # unreadable
        {"file": str(audio / "long.wav"), "emotion": "sad", "spk": "spk2"},  # over 30 s
    ]
    rows[0]["emotion"] = rows[3]["emotion"] = "Angry"  # one class spelt two ways (by two speakers)
    rows[1]["emotion"] = "bored"  # outside --labels, and of one speaker
    manifest = write_manifest(audio / "corpus.csv", rows)  # ids: the file stems
    result = cli("check-corpus", manifest, "--corpus", "csv",
                 "--columns", COLUMNS, "--labels", "angry,happy,sad,Angry")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    problems = [line for line in lines if line.split(":")[0] in ("missing", "unreadable", "label", "speakers", "folds")]
    assert len(problems) == 6, result.output
    assert any(line.startswith("missing: gone:") and "gone.wav does not exist" in line for line in lines)
    assert any(line.startswith("unreadable: garbage: not a readable audio file") for line in lines)
    assert any(line.startswith("unreadable: long: longer than 30 s") for line in lines)
    assert any(line.startswith("label: 'bored' (1 utterances, e.g. spk0_1_happy) is not one of --labels") for line in lines)
    assert any(line.startswith("label: 'Angry' (2) and 'angry' (7) differ only in case") for line in lines)
    assert any(line.startswith("speakers: class 'bored' is spoken by 'spk0' alone") for line in lines)
    assert lines[-1] == f"Error: 6 problems in {manifest} (listed above): fix them, then extract"


def test_too_few_speakers_for_the_folds_and_classes_some_folds_never_test(tmp_path):
    rows = rows_of(write_corpus(tmp_path / "audio", n_speakers=3, per_speaker=3))
    manifest = write_manifest(tmp_path / "corpus.csv", rows)
    report = check_corpus("csv", manifest, columns=COLUMNS, n_folds=5)
    assert report.problems == ["folds: 5 folds but only 3 speakers: every fold needs its own test speakers, "
                               "so use at most 3 folds"]
    rare = rows + [{"file": rows[0]["file"].replace("spk0_0", "x"), "emotion": "calm", "spk": s} for s in ("spk0", "spk1")]
    for row, s in zip(rare[-2:], "ab"):
        row["file"] = str(tmp_path / "audio" / f"calm_{s}.wav")
        sf.write(row["file"], tone(0.5), 16000)
    report = check_corpus("csv", write_manifest(tmp_path / "rare.csv", rare), columns=COLUMNS, n_folds=3)
    assert report.problems == ["speakers: class 'calm' (2 speakers) is tested in 2 of 3 folds: the others' metrics "
                               "leave it out; use fewer folds (--folds) or add speakers"]


def test_a_corpus_the_reader_refuses_is_one_problem(tmp_path):
    (tmp_path / "corpus.csv").write_text("file,emotion\na.wav,angry\n")
    result = cli("check-corpus", tmp_path / "corpus.csv", "--corpus", "csv")
    assert result.exit_code == 1
    assert result.output.startswith("corpus: ") and "missing column(s) path, label, speaker" in result.output
    assert "Error: 1 problem in" in result.output


def test_the_corpus_must_be_named(tmp_path):
    result = cli("check-corpus", tmp_path)
    assert result.exit_code == 2 and "Missing option '--corpus'" in result.output


def test_inspect_shows_the_manifest_audio_root_and_columns(tmp_path, clean, tiny_checkpoint):
    rows = [{**r, "file": Path(r["file"]).name} for r in clean]
    manifest = write_manifest(tmp_path / "lists.csv", rows)
    result = cli("extract", manifest, "--corpus", "csv", "--columns", COLUMNS, "--audio-root", tmp_path / "audio",
                 "--label-map", "shemo4", "--model", tiny_checkpoint, "--out", tmp_path / "cache", "--device", "cpu",
                 "--mode", "short", "--limit", "4")
    assert result.exit_code == 0, result.output
    text = cli("inspect", tmp_path / "cache").output
    for line in (f"manifest {manifest}", f"audio root {tmp_path / 'audio'}",
                 f"columns {COLUMNS} (other fields from columns of their own name)", "label map shemo4"):
        assert f"\n  {line}\n" in text, text
    source = json.loads(cli("inspect", tmp_path / "cache", "--json").output)["provenance"]["corpus_source"]
    assert source == {"corpus": "csv", "data": str(manifest), "manifest": str(manifest),
                      "audio_root": str(tmp_path / "audio"), "columns": COLUMNS, "label_map": "shemo4"}


def test_inspect_names_the_folder_of_a_folder_corpus(tmp_path, tiny_checkpoint):
    (tmp_path / "shemo" / "female").mkdir(parents=True)
    for name in ("F01A01", "F02A01"):
        sf.write(tmp_path / "shemo" / "female" / f"{name}.wav", tone(0.5), 16000)
    result = cli("extract", tmp_path / "shemo", "--corpus", "shemo", "--model", tiny_checkpoint,
                 "--out", tmp_path / "cache", "--device", "cpu", "--mode", "short")
    assert result.exit_code == 0, result.output
    assert f"\n  folder {tmp_path / 'shemo'}\n  label map none\n" in cli("inspect", tmp_path / "cache").output
