"""Hugging Face audio datasets as corpora (--corpus hf): saved with save_to_disk or as parquet,
read in place, giving the records and the states of the same audio read from files."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from datasets import Audio, ClassLabel, Dataset, DatasetDict, Features, Value

from ser_cache.audio import AudioError, load_utterance
from ser_cache.cache import open_cache
from ser_cache.cli import main
from ser_cache.corpora import prepare
from ser_cache.hfexamples import RowRef
from ser_cache.records import RecordsError, Utterance

from conftest import tone

LABELS = ["angry", "happy", "sad"]
RATES = (16000, 22050, 8000)  # the datasets' own rates; every input is resampled to 16 kHz


def write_files(folder: Path, n_speakers: int = 3, per_speaker: int = 2) -> list[dict]:
    """Tiny audio files at several rates and their rows: id, file, label, speaker, arousal."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_speakers):
        for u in range(per_speaker):
            i = s * per_speaker + u
            rate, label = RATES[i % len(RATES)], LABELS[i % len(LABELS)]
            path = folder / f"spk{s}_{u}.wav"
            sf.write(path, tone(0.4 + 0.1 * u, rate=rate, freq=150 + 40 * i, seed=i)[:, 0], rate)
            rows.append({"id": path.stem, "file": str(path), "label": label, "speaker": f"spk{s}",
                         "arousal": 1.0 + i})
    return rows


def as_dataset(rows: list[dict]) -> Dataset:
    """The rows as a dataset: the files' bytes in an Audio column (as save_to_disk and
    push_to_hub embed them), the label a ClassLabel, the speaker under another name."""
    table = {"audio": [{"bytes": Path(r["file"]).read_bytes(), "path": Path(r["file"]).name} for r in rows],
             "emotion": [LABELS.index(r["label"]) for r in rows], "spk_id": [r["speaker"] for r in rows],
             "id": [r["id"] for r in rows], "arousal": [r["arousal"] for r in rows]}
    features = Features({"audio": Audio(), "emotion": ClassLabel(names=LABELS), "spk_id": Value("string"),
                         "id": Value("string"), "arousal": Value("float64")})
    # cast, not from_dict(features=...): encoding an Audio example would need torchcodec
    return Dataset.from_dict(table).cast(features)


def splits_of(rows: list[dict]) -> dict[str, Dataset]:
    return {"train": as_dataset(rows[:4]), "test": as_dataset(rows[4:])}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets converts parquet into its cache: a temporary one, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture()
def rows(tmp_path) -> list[dict]:
    return write_files(tmp_path / "audio")


@pytest.fixture()
def reference(tmp_path, rows) -> list[Utterance]:
    """The records of the same audio listed in a CSV manifest."""
    manifest = tmp_path / "lists" / "corpus.csv"
    manifest.parent.mkdir()
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "file", "label", "speaker", "arousal"])
        w.writeheader()
        w.writerows(rows)
    return prepare("csv", manifest, columns="path=file").records


def save(kind: str, rows: list[dict], folder: Path) -> Path:
    """The dataset saved as `kind`: a save_to_disk folder, a folder of parquet files named by
    split, or one parquet file (split train)."""
    if kind == "save_to_disk":
        DatasetDict(splits_of(rows)).save_to_disk(str(folder))
        return folder
    folder.mkdir(parents=True)
    if kind == "parquet file":
        as_dataset(rows).to_parquet(str(folder / "corpus.parquet"))
        return folder / "corpus.parquet"
    for split, ds in splits_of(rows).items():
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def fields(records: list[Utterance]) -> list[tuple]:
    return sorted((r.id, r.label, r.speaker, r.group, r.targets, round(r.duration, 6), r.size) for r in records)


COLUMNS = "label=emotion,speaker=spk_id"


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet folder", "parquet file"])
def test_a_saved_dataset_gives_the_records_of_the_same_files(tmp_path, rows, reference, kind):
    data = save(kind, rows, tmp_path / "ds")
    prepared = prepare("hf", data, columns=COLUMNS)
    assert fields(prepared.records) == fields(reference)
    assert {r.listed_path for r in prepared.records} == {Path(r["file"]).name for r in rows}
    refs = [RowRef.parse(r.path) for r in prepared.records]
    assert {ref.location for ref in refs} == {str(data)} and {ref.column for ref in refs} == {"audio"}
    splits = {"train": 4, "test": 2} if kind != "parquet file" else {"train": 6}
    assert prepared.source["splits"] == splits and prepared.source["columns"] == COLUMNS


def test_without_an_id_column_ids_are_split_and_row(tmp_path, rows):
    DatasetDict({k: ds.remove_columns("id") for k, ds in splits_of(rows).items()}).save_to_disk(str(tmp_path / "ds"))
    records = prepare("hf", tmp_path / "ds", columns=COLUMNS).records
    assert sorted(r.id for r in records) == ["test/0", "test/1", "train/0", "train/1", "train/2", "train/3"]


def test_an_example_reads_as_its_file_does(tmp_path, rows):
    data = save("save_to_disk", rows, tmp_path / "ds")
    by_id = {r.id: r for r in prepare("hf", data, columns=COLUMNS).records}
    for row in rows:
        ours, theirs = load_utterance(by_id[row["id"]].path)[0], load_utterance(row["file"])[0]
        np.testing.assert_array_equal(ours[0], theirs[0])


def states(cache_dir: Path, layer: int) -> dict[str, np.ndarray]:
    data = open_cache(cache_dir).read_layer(layer)
    return {i: data.frames[data.offsets[k]:data.offsets[k + 1]] for k, i in enumerate(data.ids)}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet folder"])
def test_the_same_states_as_the_files_and_inspect_says_where_they_came_from(tmp_path, rows, reference, kind,
                                                                            tiny_checkpoint):
    data = save(kind, rows, tmp_path / "ds")
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--mode", "short", "--shard-mb", "0.02"]
    result = cli("extract", data, "--corpus", "hf", "--columns", COLUMNS, "--out", tmp_path / "hf", *common)
    assert result.exit_code == 0, result.output
    result = cli("extract", tmp_path / "lists" / "corpus.csv", "--corpus", "csv", "--columns", "path=file",
                 "--out", tmp_path / "files", *common)
    assert result.exit_code == 0, result.output
    assert open_cache(tmp_path / "hf").settings.records_hash == open_cache(tmp_path / "files").settings.records_hash
    for layer in (0, 2):
        ours, theirs = states(tmp_path / "hf", layer), states(tmp_path / "files", layer)
        assert sorted(ours) == sorted(r.id for r in reference)
        for uid in ours:
            np.testing.assert_array_equal(ours[uid], theirs[uid])
    text = cli("inspect", tmp_path / "hf").output
    assert f"dataset {data} (splits train 4, test 2; audio column audio)" in text
    assert f"columns {COLUMNS} (other fields from columns of their own name)" in text
    assert cli("verify", tmp_path / "hf").exit_code == 0


def test_a_moved_dataset_resumes_its_cache(tmp_path, rows, tiny_checkpoint):
    data = save("save_to_disk", rows, tmp_path / "ds")
    args = ["--corpus", "hf", "--columns", COLUMNS, "--out", tmp_path / "cache", "--model", tiny_checkpoint,
            "--device", "cpu", "--mode", "short", "--shard-mb", "0.02"]
    assert cli("extract", data, *args, "--shard", "0/2").exit_code == 0
    shutil.move(data, tmp_path / "moved")
    result = cli("extract", tmp_path / "moved", *args)
    assert result.exit_code == 0 and re.search(r"cache .*: complete", result.output), result.output


def test_an_example_without_audio_is_named_and_skipped(tmp_path, rows, tiny_checkpoint):
    """A parquet written without embedding keeps only the files' paths: one of them is gone."""
    table = Dataset.from_dict({"audio": [{"bytes": None, "path": r["file"]} for r in rows],
                               "label": [r["label"] for r in rows], "speaker": [r["speaker"] for r in rows]})
    (tmp_path / "pq").mkdir()
    table.cast_column("audio", Audio()).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    Path(rows[0]["file"]).unlink()
    prepared = prepare("hf", tmp_path / "pq")
    assert "warning: 1 examples hold no audio" in prepared.summary() and "train/0" in prepared.summary()
    with pytest.raises(AudioError, match="holds no audio"):
        load_utterance(prepared.records[0].path)
    result = cli("extract", tmp_path / "pq", "--corpus", "hf", "--out", tmp_path / "cache", "--model",
                 tiny_checkpoint, "--device", "cpu", "--mode", "short")
    assert result.exit_code == 0, result.output
    assert [s["id"] for s in open_cache(tmp_path / "cache").skipped()] == ["train/0"]


def test_predict_reads_a_dataset_example_by_its_reference(tmp_path, rows):
    data = save("save_to_disk", rows, tmp_path / "ds")
    ref = str(RowRef(str(data), "test", 1, "audio"))
    assert len(load_utterance(ref)[0][0]) == len(load_utterance(rows[5]["file"])[0][0])
    with pytest.raises(AudioError, match="no split 'dev'"):
        load_utterance(str(RowRef(str(data), "dev", 0, "audio")))


# --- refusals, one line naming the fix ----------------------------------------------------------

def test_the_audio_column_is_found_or_named(tmp_path, rows):
    ds = as_dataset(rows)
    ds.add_column("speech", [None] * len(rows)).cast_column("speech", Audio()).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(RecordsError, match=r"several Audio columns \(audio, speech\).*--columns path=COLUMN"):
        prepare("hf", tmp_path / "two", columns=COLUMNS)
    ds.cast_column("audio", Features({"bytes": Value("binary"), "path": Value("string")})).save_to_disk(
        str(tmp_path / "plain"))
    with pytest.raises(RecordsError, match=r"no column of feature Audio .*--columns path=COLUMN"):
        prepare("hf", tmp_path / "plain", columns=COLUMNS)
    records = prepare("hf", tmp_path / "plain", columns=COLUMNS + ",path=audio").records
    assert len(records) == len(rows)
    with pytest.raises(RecordsError, match=r"column 'spk_id' holds Value\('string'\), not audio"):
        prepare("hf", tmp_path / "plain", columns="path=spk_id,label=emotion,speaker=spk_id")


def test_missing_columns_and_repeated_ids_are_refused(tmp_path, rows):
    data = save("save_to_disk", rows, tmp_path / "ds")
    with pytest.raises(RecordsError, match=r"missing column\(s\) speaker .*the dataset must have the columns"):
        prepare("hf", data, columns="label=emotion")
    same = as_dataset(rows[:2])
    DatasetDict({"train": same, "test": same}).save_to_disk(str(tmp_path / "twice"))
    with pytest.raises(RecordsError, match=r"split train example 0 and split test example 0 have the same id "
                                           r"'spk0_0'.*--columns id=COLUMN"):
        prepare("hf", tmp_path / "twice", columns=COLUMNS)


def test_no_dataset_and_an_unreachable_hub_name_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordsError, match="holds no dataset: neither state.json nor dataset_dict.json"):
        prepare("hf", tmp_path / "empty")
    with pytest.raises(RecordsError, match="does not exist: pass a folder written by save_to_disk"):
        prepare("hf", tmp_path / "no such folder")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/emotions' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    result = cli("extract", "someone/emotions", "--corpus", "hf", "--model", "unused.pt", "--out", tmp_path / "c")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert ("'someone/emotions' is no local path and could not be loaded from the Hugging Face hub (Couldn't "
            "reach") in result.output
    assert "datasets.load_dataset('someone/emotions').save_to_disk('DIR')" in result.output


def test_hf_reads_columns_but_no_audio_root(tmp_path, rows):
    data = save("save_to_disk", rows, tmp_path / "ds")
    with pytest.raises(RecordsError, match=r"--audio-root: only read with corpus 'csv' or 'emobox'"):
        prepare("hf", data, columns=COLUMNS, audio_root=tmp_path)


def test_records_of_a_dataset_round_trip_through_json(tmp_path, rows):
    """A reference is a plain string in records.jsonl: the cache needs nothing else to find the audio."""
    data = save("save_to_disk", rows, tmp_path / "ds")
    r = prepare("hf", data, columns=COLUMNS).records[0]
    assert RowRef.parse(json.loads(json.dumps(r.path))) == RowRef(str(data), "train", 0, "audio")
