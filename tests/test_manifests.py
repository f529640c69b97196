"""Manifests as users write them: CSV or JSON Lines, absolute or relative paths, an audio root,
symlinks, renamed columns; a cache that does not depend on where the corpus lies."""
from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf
from click.testing import CliRunner

from ser_cache.cache import open_cache
from ser_cache.cli import main
from ser_cache.corpora import prepare
from ser_cache.encoder import load_encoder
from ser_cache.extract import ExtractOptions, extract
from ser_cache.records import (RecordsError, Utterance, changed_audio, load_records, records_hash,
                               save_records)

from conftest import tone, write_corpus

SMALL_SHARDS = 20_000  # bytes: a few utterances per shard, so a plan has several shards


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """A CSV, or JSON Lines when `path` ends in .jsonl, of `rows` (their keys the columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def rows_of(corpus: list[Utterance], path=lambda r: Path(r.path).name, **names) -> list[dict]:
    """Manifest rows of a write_corpus corpus; `names` renames the columns (path="file")."""
    def name(field):
        return names.get(field, field)
    return [{name("path"): path(r), name("label"): r.label, name("speaker"): r.speaker}
            for r in corpus]


def fields(records: list[Utterance]) -> list[tuple]:
    return [(r.id, r.label, r.speaker, r.group, r.targets) for r in records]


@pytest.fixture()
def corpus(tmp_path) -> list[Utterance]:
    """A tiny corpus in tmp_path/audio and its reference records (ids = file stems)."""
    return write_corpus(tmp_path / "audio", n_speakers=3, per_speaker=2)


@pytest.fixture()
def reference(tmp_path, corpus) -> list[Utterance]:
    """The records of today's layout: utterances.csv beside the audio, relative paths."""
    write_manifest(tmp_path / "audio" / "utterances.csv", rows_of(corpus))
    return prepare("csv", tmp_path / "audio").records


# --- paths: absolute, under another audio root, through symlinks -----------------------------

def test_reference_layout_gives_the_file_stems_as_ids(corpus, reference):
    assert [r.id for r in reference] == [Path(r.path).stem for r in corpus]
    assert all(r.size == Path(r.path).stat().st_size > 0 for r in reference)
    assert [r.listed_path for r in reference] == [Path(r.path).name for r in corpus]


def test_absolute_paths_with_the_audio_root_give_the_same_records(tmp_path, corpus, reference):
    manifest = write_manifest(tmp_path / "lists" / "abs.csv", rows_of(corpus, path=lambda r: r.path))
    records = prepare("csv", manifest, audio_root=tmp_path / "audio").records
    assert fields(records) == fields(reference)
    assert [r.listed_path for r in records] == [r.path for r in corpus]  # kept as written
    assert [r.path for r in records] == [r.path for r in reference]
    assert records_hash(records) == records_hash(reference)


def test_absolute_paths_outside_the_audio_root_name_the_folder_to_pass(tmp_path, corpus):
    manifest = write_manifest(tmp_path / "lists" / "abs.csv", rows_of(corpus, path=lambda r: r.path))
    with pytest.raises(RecordsError, match=rf"abs\.csv, row 2: path '.*spk0_0_angry\.wav' points "
                                           rf"outside the audio root {tmp_path / 'lists'} \(the "
                                           rf"manifest's folder\) \(and 5 more rows\).*: pass "
                                           rf"--audio-root {tmp_path / 'audio'} \(the folder"):
        prepare("csv", manifest)


def test_absolute_paths_with_an_id_column_need_no_audio_root(tmp_path, corpus):
    rows = [{"id": f"u{i}", **row} for i, row in enumerate(rows_of(corpus, path=lambda r: r.path))]
    records = prepare("csv", write_manifest(tmp_path / "lists" / "ids.csv", rows)).records
    assert [r.id for r in records] == [f"u{i}" for i in range(len(corpus))]


def test_relative_paths_start_from_the_audio_root(tmp_path, corpus, reference):
    manifest = write_manifest(tmp_path / "lists" / "rel.csv", rows_of(corpus))
    records = prepare("csv", manifest, audio_root=tmp_path / "audio").records
    assert fields(records) == fields(reference)
    assert [r.path for r in records] == [r.path for r in reference]


def test_a_wrong_audio_root_is_refused_naming_the_option(tmp_path, corpus):
    manifest = write_manifest(tmp_path / "lists" / "rel.csv", rows_of(corpus))  # no audio there
    with pytest.raises(RecordsError, match=r"none of the 6 audio files .*rel\.csv lists exists, for "
                                           r"example row 2: 'spk0_0_angry\.wav' \(looked for .*\): "
                                           r"pass --audio-root the folder"):
        prepare("csv", manifest)
    with pytest.raises(RecordsError, match=r"audio root .*nowhere is not a folder: pass --audio-root"):
        prepare("csv", manifest, audio_root=tmp_path / "nowhere")


def test_a_csv_beside_a_folder_of_symlinks_is_followed(tmp_path, corpus, reference):
    links = tmp_path / "mine" / "links"
    links.mkdir(parents=True)
    for r in corpus:
        (links / Path(r.path).name).symlink_to(r.path)
    manifest = write_manifest(tmp_path / "mine" / "utterances.csv",
                              rows_of(corpus, path=lambda r: f"links/{Path(r.path).name}"))
    records = prepare("csv", manifest).records
    assert [r.id for r in records] == [f"links/{r.id}" for r in reference]  # ids: paths as listed
    assert [r.path for r in records] == [r.path for r in reference]  # the files the links point to
    assert [r.duration for r in records] == [r.duration for r in reference]


def test_an_audio_root_reached_through_a_symlink(tmp_path, corpus, reference):
    (tmp_path / "alias").symlink_to(tmp_path / "audio")
    manifest = write_manifest(tmp_path / "lists" / "abs.csv", rows_of(
        corpus, path=lambda r: str(tmp_path / "alias" / Path(r.path).name)))
    records = prepare("csv", manifest, audio_root=tmp_path / "alias").records
    assert fields(records) == fields(reference)


# --- renamed columns ---------------------------------------------------------------------------

def test_columns_map_the_manifests_names(tmp_path, corpus, reference, caplog):
    rows = [{"file": row["path"], "emotion": row["label"], "spk_id": row["speaker"], "path": "x",
             "session": f"s{i % 2}", "arousal": str(i)}
            for i, row in enumerate(rows_of(corpus))]
    manifest = write_manifest(tmp_path / "audio" / "theirs.csv", rows)
    with caplog.at_level(logging.WARNING, logger="ser_cache.corpora"):
        records = prepare("csv", manifest, columns=" Path=file, label=Emotion,speaker=spk_id,"
                                                    "group=session").records
    assert [(r.id, r.label, r.speaker) for r in records] == [
        (r.id, r.label, r.speaker) for r in reference]
    assert [r.group for r in records] == [f"s{i % 2}" for i in range(len(rows))]
    assert [dict(r.targets) for r in records] == [{"arousal": float(i)} for i in range(len(rows))]
    assert "column(s) path are ignored: --columns reads those fields from other columns" in caplog.text


def test_an_id_column_by_another_name(tmp_path, corpus):
    rows = [{"key": f"utt{i}", **row} for i, row in enumerate(rows_of(corpus))]
    manifest = write_manifest(tmp_path / "audio" / "keys.csv", rows)
    assert [r.id for r in prepare("csv", manifest, columns="id=key").records] == [
        f"utt{i}" for i in range(len(rows))]


@pytest.mark.parametrize("spec, message", [
    ("path=file,label=emo,speaker=spk_id",
     r"row 1: missing column\(s\) emo \(for label\) \(the manifest's columns are file, emotion, "
     r"spk_id\): the first row must name the columns path, label, speaker .*--columns path=file"),
    ("path=file,label=emotion", r"missing column\(s\) speaker \(the manifest's columns are file, "
                                r"emotion, spk_id\)"),
    ("path=file,label=emotion,speaker=spk_id,group=session",
     r"missing column\(s\) session \(for group\) \(the manifest's columns are file"),
    ("path=file,emo=emotion", r"--columns 'path=file,emo=emotion': unknown field 'emo'; the "
                              r"fields are path, label, speaker, id, group \(the manifest's "
                              r"columns are file, emotion, spk_id\)"),
    ("path=file,label", r"'label' is not FIELD=COLUMN: write e\.g\. --columns path=file,"
                        r"label=emotion,speaker=spk_id \(the manifest's columns are file"),
    ("path=file,path=wav", r"field 'path' is mapped twice: map it once \(the manifest's columns"),
])
def test_bad_columns_are_refused_naming_the_manifests_columns(tmp_path, corpus, spec, message):
    rows = [{"file": r["path"], "emotion": r["label"], "spk_id": r["speaker"]} for r in rows_of(corpus)]
    manifest = write_manifest(tmp_path / "audio" / "theirs.csv", rows)
    with pytest.raises(RecordsError, match=message) as e:
        prepare("csv", manifest, columns=spec)
    assert "\n" not in str(e.value)


def test_manifest_options_are_refused_for_other_corpora(tmp_path):
    with pytest.raises(RecordsError, match=r"--audio-root, --columns: only read with corpus 'csv', "
                                           r"not 'ravdess': drop --audio-root, --columns or use"):
        prepare("ravdess", tmp_path, audio_root=tmp_path, columns="path=file")


# --- JSON Lines ----------------------------------------------------------------------------------

def test_jsonl_manifest_gives_the_csv_records(tmp_path, corpus, reference):
    rows = [{"wav": r.path, "emo": r.label, "spk": r.speaker, "valence": i / 2, "note": None}
            for i, r in enumerate(corpus)]
    manifest = write_manifest(tmp_path / "lists" / "data.jsonl", rows)
    prepared = prepare("csv", manifest, audio_root=tmp_path / "audio",
                       columns="path=wav,label=emo,speaker=spk")
    assert [(r.id, r.label, r.speaker) for r in prepared.records] == [
        (r.id, r.label, r.speaker) for r in reference]
    assert [dict(r.targets) for r in prepared.records] == [{"valence": i / 2} for i in range(len(rows))]
    assert [r.path for r in prepared.records] == [r.path for r in reference]


@pytest.mark.parametrize("text, message", [
    ('{"path": "a.wav", "label": "angry", "speaker": "s1"}\n{"path": "b.wav", "label": \n',
     r"data\.jsonl, line 2: not JSON \(.*\): write one JSON object per line"),
    ('["a.wav", "angry", "s1"]\n', r"line 1: '\[\"a\.wav\".*' is not a JSON object: write one object"),
    ('{"path": "a.wav", "label": "angry", "Label": "sad", "speaker": "s1"}\n',
     r"line 1: key 'label' given twice"),
    ("\n\n", r"data\.jsonl holds no JSON objects: write one per utterance"),
    ('{"path": "a.wav", "label": "angry"}\n', r"data\.jsonl: missing column\(s\) speaker \(the "
                                              r"manifest's columns are path, label\): every object must"),
    ('{"path": "a.wav", "label": "angry", "speaker": "s1"}\n{"path": "b.wav", "label": "sad"}\n',
     r"data\.jsonl, line 2: the speaker field is empty: fill it in or delete the line"),
    ('{"path": "a.wav", "label": "angry", "speaker": "s1", "arousal": 2}\n'
     '{"path": "b.wav", "label": "sad", "speaker": "s2", "arousal": null}\n',
     r"line 2, column 'arousal': the cell is empty"),
])
def test_bad_jsonl_is_refused_naming_the_line(tmp_path, text, message):
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, tone(0.3), 16000)
    (tmp_path / "data.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(RecordsError, match=message):
        prepare("csv", tmp_path / "data.jsonl")


# --- what else a user can get wrong ----------------------------------------------------------------

@pytest.mark.parametrize("rows, message", [
    ([("u1", "a.wav", "angry", "s1"), ("", "b.wav", "sad", "s2")],
     r"row 3: the id field is empty: fill it in or delete the row"),
    ([("u1", "a.wav", "angry", "s1"), ("u1", "b.wav", "sad", "s2")],
     r"rows 2 and 3 have the same id 'u1': ids must be unique"),
    ([("u1", "a.wav", "angry", "s1"), ("u2", "./a.wav", "sad", "s2")],
     r"rows 2 and 3 list the same audio file '.*a\.wav': list each file once"),
    ([("u1", "a.wav", "angry", "s1"), ("u2", ".", "sad", "s2")],
     r"row 3: path '\.' is a folder .*, not an audio file"),
])
def test_bad_rows_are_refused_naming_the_row(tmp_path, rows, message):
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, tone(0.3), 16000)
    write_manifest(tmp_path / "utterances.csv",
                   [dict(zip(("id", "path", "label", "speaker"), row)) for row in rows])
    with pytest.raises(RecordsError, match=message):
        prepare("csv", tmp_path)


def test_a_missing_file_among_others_is_kept_and_named(tmp_path, corpus):
    rows = rows_of(corpus) + [{"path": "gone.wav", "label": "sad", "speaker": "spk1"}]
    write_manifest(tmp_path / "audio" / "utterances.csv", rows)
    prepared = prepare("csv", tmp_path / "audio")
    gone = prepared.records[-1]
    assert (gone.id, gone.duration, gone.size) == ("gone", 0.0, 0)
    assert "warning: 1 files do not exist (the extractor will skip and record them; fix their " \
           "paths, or --audio-root): gone" in prepared.summary()


# --- the records and their hash ------------------------------------------------------------------

def test_records_hash_ignores_where_the_files_are_and_their_sizes(reference):
    moved = [replace(r, path=f"/elsewhere/{r.id}.wav", listed_path=f"/elsewhere/{r.id}.wav",
                     size=r.size + 1) for r in reference]
    assert records_hash(moved) == records_hash(reference)
    assert records_hash([replace(reference[0], label="sad")] + reference[1:]) != records_hash(reference)


def test_listed_path_and_size_round_trip_and_old_records_still_load(tmp_path, reference):
    save_records(reference, tmp_path / "records.jsonl")
    assert load_records(tmp_path / "records.jsonl") == reference
    old = {"id": "a", "path": "/x/a.wav", "label": "angry", "speaker": "s1", "group": "",
           "duration": 1.0, "original_label": "angry"}  # a row written before sizes existed
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    (r,) = load_records(tmp_path / "old.jsonl")
    assert (r.listed_path, r.size) == ("", 0)
    save_records([r], tmp_path / "again.jsonl")
    assert json.loads((tmp_path / "again.jsonl").read_text()) == old  # written as before


def test_changed_audio_compares_only_recorded_sizes(reference):
    grown = [replace(reference[0], size=reference[0].size + 2)] + reference[1:]
    assert changed_audio(reference, grown) == [reference[0].id]
    assert changed_audio([replace(r, size=0) for r in reference], grown) == []  # an old cache
    assert changed_audio(reference, grown[2:]) == []  # --limit: a subset


# --- a corpus moved after extraction ---------------------------------------------------------------

@pytest.fixture(scope="module")
def enc(tiny_checkpoint):
    return load_encoder(str(tiny_checkpoint))


def test_a_moved_corpus_resumes_its_cache_with_the_audio_root(tmp_path, corpus, enc):
    manifest = write_manifest(tmp_path / "lists" / "corpus.csv", rows_of(corpus))
    opts = ExtractOptions(progress=False, shard_bytes=SMALL_SHARDS, mode="short")
    first = prepare("csv", manifest, audio_root=tmp_path / "audio").records
    done = extract(first, tmp_path / "cache", "csv", enc, replace(opts, shard=(0, 2)))
    assert 0 < done.shards_written < done.shards_planned  # half the shards: an unfinished cache
    shards = open_cache(tmp_path / "cache").shard_dir
    before = {f.name: f.read_bytes() for f in shards.glob("*.h5")}
    shutil.move(tmp_path / "audio", tmp_path / "moved")
    again = prepare("csv", manifest, audio_root=tmp_path / "moved").records
    assert records_hash(again) == records_hash(first)
    assert all(r.path.startswith(str((tmp_path / "moved").resolve())) for r in again)
    summary = extract(again, tmp_path / "cache", "csv", enc, opts)  # resumed, not refused
    assert summary.shards_done_before == done.shards_written
    assert summary.shards_written == summary.shards_planned - done.shards_written
    cache = open_cache(tmp_path / "cache")
    assert cache.complete and not cache.skipped()
    assert {f.name: f.read_bytes() for f in shards.glob("*.h5") if f.name in before} == before
    assert sorted(cache.read_layer(1).ids) == sorted(r.id for r in first)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_resumes_a_moved_corpus_and_refuses_other_audio(tmp_path, corpus, tiny_checkpoint):
    rows = [{"file": str(tmp_path / "audio" / Path(r.path).name), "emotion": r.label,
             "spk_id": r.speaker} for r in corpus]
    manifest = write_manifest(tmp_path / "lists" / "corpus.csv", rows)
    args = ["extract", manifest, "--corpus", "csv", "--columns", "path=file,label=emotion,speaker=spk_id",
            "--model", tiny_checkpoint, "--out", tmp_path / "cache", "--device", "cpu", "--mode", "short",
            "--shard-mb", "0.02"]
    result = cli(*args, "--audio-root", tmp_path / "audio")
    assert result.exit_code == 0, result.output
    shutil.move(tmp_path / "audio", tmp_path / "moved")
    write_manifest(manifest, [{**row, "file": row["file"].replace("/audio/", "/moved/")} for row in rows])
    result = cli(*args, "--audio-root", tmp_path / "moved")
    assert result.exit_code == 0, result.output
    assert re.search(r"cache .*: complete", result.output), result.output
    sf.write(tmp_path / "moved" / Path(corpus[0].path).name, tone(1.5), 16000)  # other audio, same name
    result = cli(*args, "--audio-root", tmp_path / "moved")
    assert result.exit_code == 1
    assert re.search(r"1 audio files differ from those the cache .* was made from, for example "
                     rf"'{corpus[0].id}': \d+ bytes then, \d+ bytes now .*; point --audio-root",
                     result.output), result.output
