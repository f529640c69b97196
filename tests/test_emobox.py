"""EmoBox metadata and folds: records with speakers from file names, folds from fold_K files,
speaker-overlapping folds refused unless asked for, and then labelled FLAWED everywhere.

The files are written here in EmoBox's layout (format facts only): data/<dataset>/<dataset>.jsonl,
label_map.json and fold_K/<dataset>_{train,test}_fold_K.jsonl, audio under downloads/.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from ser_cache.cli import main
from ser_cache.compare import CompareError, compare
from ser_cache.corpora import prepare
from ser_cache.folds import NOT_TESTED, FoldsError, make_folds
from ser_cache.records import RecordsError

from conftest import tone, write_corpus

URDU_CODES = {"angry": "A", "happy": "H", "sad": "S"}
URDU_MAP = {"A": "Angry", "H": "Happy", "S": "Sad"}


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def emobox_line(key: str, wav: str, emo: str, dataset: str, **extra) -> dict:
    """One line as EmoBox writes it, bookkeeping included."""
    return {"key": key, "dataset": dataset, "wav": wav, "type": "raw", "sample_rate": 16000,
            "num_frame": 8000.0, "task": "category", "length": 0.5, "emo": emo, "channel": 1, **extra}


def write_urdu(root: Path, n_speakers: int = 6, per_speaker: int = 4) -> tuple[Path, Path, list[dict]]:
    """A tiny URDU-like corpus in EmoBox's layout: (data/urdu folder, audio root, its lines).

    File names SM<s>_F<u>_<E><nnn> as URDU's; labels cycle so every class has several speakers.
    """
    labels = list(URDU_CODES)
    lines = []
    for s in range(1, n_speakers + 1):
        for u in range(per_speaker):
            label = labels[(s + u) % len(labels)]
            stem = f"SM{s}_F{u + 1}_{URDU_CODES[label]}{s:02d}{u}"
            wav = f"downloads/urdu/{label.title()}/{stem}.wav"
            path = root / "audio" / wav
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, tone(0.4 + 0.1 * u, freq=150 + 50 * labels.index(label), seed=10 * s + u), 16000)
            lines.append(emobox_line(f"urdu-{stem}", wav, URDU_CODES[label], "urdu"))
    data = root / "data" / "urdu"
    write_jsonl(data / "urdu.jsonl", lines)
    (data / "label_map.json").write_text(json.dumps(URDU_MAP), encoding="utf-8")
    return data, root / "audio", lines


def write_folds(folder: Path, dataset: str, lines: list[dict], tested: list[set[str]]) -> Path:
    """fold_K/<dataset>_{train,test}_fold_K.jsonl in `folder`: fold K tests the keys tested[K-1]
    and trains on every other line."""
    for k, keys in enumerate(tested, 1):
        write_jsonl(folder / f"fold_{k}" / f"{dataset}_test_fold_{k}.jsonl", [x for x in lines if x["key"] in keys])
        write_jsonl(folder / f"fold_{k}" / f"{dataset}_train_fold_{k}.jsonl",
                    [x for x in lines if x["key"] not in keys])
    return folder


def speaker_of_key(key: str) -> str:
    return key.split("-")[1].split("_")[0]  # urdu-SM3_F2_H031 -> SM3


def by_speakers(lines, groups) -> list[set[str]]:
    """Test sets holding every key of the speakers of each group: speaker-independent folds."""
    return [{x["key"] for x in lines if speaker_of_key(x["key"]) in group} for group in groups]


def by_utterance(lines, n_folds: int) -> list[set[str]]:
    """Test sets cutting across speakers (each speaker in every fold): speaker-dependent folds."""
    return [{x["key"] for i, x in enumerate(lines) if i % n_folds == k} for k in range(n_folds)]


@pytest.fixture()
def urdu(tmp_path):
    return write_urdu(tmp_path)


# --- records --------------------------------------------------------------------------------

def test_urdu_names_give_speakers_and_label_map_gives_labels(urdu):
    data, audio, lines = urdu
    records = prepare("emobox", data, audio_root=audio).records
    assert [r.id for r in records] == [x["key"] for x in lines]
    assert {r.speaker for r in records} == {f"SM{s}" for s in range(1, 7)}
    assert {r.label for r in records} == set(URDU_MAP.values()) == {r.original_label for r in records}
    assert all(r.targets == () for r in records)  # length, num_frame, ...: bookkeeping, not targets
    assert [r.listed_path for r in records] == [x["wav"] for x in lines]
    assert all(Path(r.path).is_file() and r.size > 0 for r in records)
    # the jsonl itself as DATA_DIR; without --audio-root the wav paths start from its folder
    assert [r.id for r in prepare("emobox", data / "urdu.jsonl", audio_root=audio).records] == [r.id for r in records]
    with pytest.raises(RecordsError, match=r"none of the 24 audio files .* pass --audio-root"):
        prepare("emobox", data)


def test_ravdess_names_give_the_speakers_of_the_ravdess_recipe(tmp_path):
    corpus = tmp_path / "ravdess"
    lines = []
    for actor in (1, 2):
        for emotion, name in (("01", "Neutral"), ("05", "Angry"), ("06", "Fearful")):
            stem = f"03-01-{emotion}-01-01-01-{actor:02d}"
            path = corpus / f"Actor_{actor:02d}" / f"{stem}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, tone(0.3, seed=actor), 16000)
            lines.append(emobox_line(stem, f"Actor_{actor:02d}/{stem}.wav", name, "ravdess"))
    data = tmp_path / "data" / "ravdess"
    write_jsonl(data / "ravdess.jsonl", lines)
    (data / "label_map.json").write_text(json.dumps({"Neutral": "Neutral", "Angry": "Angry", "Fearful": "Fear"}))
    mine = prepare("emobox", data, audio_root=corpus).records
    theirs = {r.id: r for r in prepare("ravdess", corpus).records}
    assert [(r.id, r.speaker) for r in mine] == [(r.id, theirs[r.id].speaker) for r in mine]
    assert {r.label for r in mine} == {"Neutral", "Angry", "Fear"}  # EmoBox's spelling, as its map gives it


def test_speaker_pattern_for_a_dataset_without_a_rule(tmp_path):
    corpus = write_corpus(tmp_path / "audio", n_speakers=3, per_speaker=2)  # spk0_0_angry.wav
    data = tmp_path / "data" / "mine"
    write_jsonl(data / "mine.jsonl", [emobox_line(r.id, Path(r.path).name, r.label, "mine", valence=i / 4)
                                      for i, r in enumerate(corpus)])
    with pytest.raises(RecordsError, match=r"no speaker rule for dataset 'mine' .*pass --speaker-pattern REGEX"):
        prepare("emobox", data, audio_root=tmp_path / "audio")
    records = prepare("emobox", data, audio_root=tmp_path / "audio", speaker_pattern=r"^(spk\d+)_").records
    assert [r.speaker for r in records] == [r.speaker for r in corpus]
    assert [r.label for r in records] == [r.label for r in corpus]  # no label_map.json: emo as written
    assert [dict(r.targets) for r in records] == [{"valence": i / 4} for i in range(len(corpus))]
    with pytest.raises(RecordsError, match=r"has 2 groups: give it exactly one"):
        prepare("emobox", data, audio_root=tmp_path / "audio", speaker_pattern=r"^(spk)(\d+)_")
    with pytest.raises(RecordsError, match=r"only read with corpus 'emobox', not 'csv'"):
        prepare("csv", tmp_path / "audio", speaker_pattern=r"^(spk\d+)_")


@pytest.mark.parametrize("which, change, message", [
    (lambda x: "/SM2_" in x["wav"], lambda x: {**x, "wav": x["wav"].replace("/SM2_", "/XX2_")},
     r"line 5: no speaker found in the file name 'XX2_F1_S020' by the urdu rule .* \(and 3 more lines\): "
     r"pass --speaker-pattern REGEX"),
    (lambda x: x["key"].startswith("urdu-SM1_F1_"), lambda x: {**x, "emo": "Q"},
     r"line 1: emo 'Q' is not in .*label_map.json .*: add it to label_map.json"),
    (lambda x: x["key"].startswith("urdu-SM1_F1_"), lambda x: {**x, "start_time": 0.1, "end_time": 0.3},
     r"line 1: a segment .*whole files are encoded"),
])
def test_bad_lines_are_refused_in_one_line_naming_the_fix(urdu, which, change, message):
    data, audio, lines = urdu
    write_jsonl(data / "urdu.jsonl", [change(x) if which(x) else x for x in lines])
    with pytest.raises(RecordsError, match=message) as e:
        prepare("emobox", data, audio_root=audio)
    assert "\n" not in str(e.value)


# --- folds ----------------------------------------------------------------------------------

def folds_of(records, **kw):
    return make_folds([r.id for r in records], [r.label for r in records], [r.speaker for r in records], **kw)


def test_fold_files_give_the_folds_they_describe(urdu):
    data, audio, lines = urdu
    records = prepare("emobox", data, audio_root=audio).records
    tested = by_speakers(lines, [("SM1", "SM2"), ("SM3", "SM4"), ("SM5", "SM6")])
    folds = folds_of(records, folds_from=write_folds(data, "urdu", lines, tested))
    assert folds.protocol == "file" and folds.n_folds == 3
    for k in range(3):  # fold_K is fold K-1
        train, val, test = folds.split(k)
        assert set(folds.ids[test]) == tested[k]
        assert not set(folds.speakers[val]) & set(folds.speakers[test])
        assert set(folds.speakers[val]) <= set(folds.speakers[train]) | set(folds.val_speakers[k])
    with pytest.raises(FoldsError, match=r"test no speaker they also train on: drop --compat-speaker-overlap"):
        folds_of(records, folds_from=data, speaker_overlap=True)


def test_speaker_overlapping_folds_are_refused_unless_asked_for(urdu):
    data, audio, lines = urdu
    records = prepare("emobox", data, audio_root=audio).records
    folder = write_folds(data, "urdu", lines, by_utterance(lines, 2))
    with pytest.raises(FoldsError, match=r"6 speakers are tested in several folds.*--compat-speaker-overlap"):
        folds_of(records, folds_from=folder)
    folds = folds_of(records, folds_from=folder, speaker_overlap=True)
    assert folds.speaker_overlap and set(folds.test_fold) == {0, 1}
    for k in range(2):
        train, val, test = folds.split(k)
        assert len(val) and not set(val) & set(test) and not set(train) & set(test)


def test_a_single_split_trains_the_untested_utterances_in_its_fold(urdu, tmp_path):
    data, audio, lines = urdu
    records = prepare("emobox", data, audio_root=audio).records
    tested = by_utterance(lines, 4)[:1]  # fold_1 only: a quarter tested, the rest trained on
    folds = folds_of(records, folds_from=write_folds(data, "urdu", lines, tested), speaker_overlap=True)
    assert folds.n_folds == 1 and (folds.test_fold == NOT_TESTED).sum() == len(lines) - len(tested[0])
    train, val, test = folds.split(0)
    assert set(folds.ids[test]) == tested[0] and len(train) > len(val) > 0
    folds.save(tmp_path / "folds.csv")
    assert folds.load(tmp_path / "folds.csv").speaker_overlap


def test_fold_files_that_do_not_fit_the_cache_are_refused(urdu):
    data, audio, lines = urdu
    records = prepare("emobox", data, audio_root=audio).records
    tested = by_speakers(lines, [("SM1", "SM2", "SM3"), ("SM4", "SM5", "SM6")])
    write_folds(data, "urdu", lines[:-1], tested)  # the last utterance in no file of fold_1
    with pytest.raises(FoldsError, match=r"fold_1 lists 1 utterances of the cache in neither its train nor"):
        folds_of(records, folds_from=data)
    with pytest.raises(RecordsError, match=r"no fold_K folders"):
        folds_of(records, folds_from=audio)


# --- end to end: extract, train, sweep, compare ----------------------------------------------

def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


TRAIN_ARGS = ("--layer", "1", "--head", "linear", "--linear-c", "1", "--device", "cpu")


def test_flawed_runs_are_labelled_and_never_compared_with_honest_ones(urdu, tmp_path, tiny_checkpoint,
                                                                      monkeypatch):
    from ser_cache import sweeping as S

    monkeypatch.setattr(S, "available_cores", lambda: 1)
    data, audio, lines = urdu
    result = cli("extract", data, "--corpus", "emobox", "--audio-root", audio, "--model", tiny_checkpoint,
                 "--out", tmp_path / "cache", "--device", "cpu", "--mode", "short")
    assert result.exit_code == 0, result.output
    assert "emobox" in result.output and "6 speakers" in result.output
    honest = write_folds(tmp_path / "honest", "urdu", lines, by_speakers(lines, [("SM1", "SM2"), ("SM3", "SM4"),
                                                                               ("SM5", "SM6")]))
    overlap = write_folds(tmp_path / "overlap", "urdu", lines, by_utterance(lines, 3))

    refused = cli("train", tmp_path / "cache", *TRAIN_ARGS, "--out", tmp_path / "refused", "--folds-from", overlap)
    assert refused.exit_code == 1 and "--compat-speaker-overlap" in refused.output, refused.output
    flawed = cli("train", tmp_path / "cache", *TRAIN_ARGS, "--out", tmp_path / "flawed", "--folds-from", overlap,
                 "--compat-speaker-overlap")
    assert flawed.exit_code == 0, flawed.output
    assert "FLAWED, not an honest estimate: speaker-dependent" in flawed.output
    config = json.loads((tmp_path / "flawed" / "config.json").read_text())
    assert config["flawed_compat"] and config["config"]["compat_speaker_overlap"]
    assert any("speaker-dependent" in f for f in config["flawed"])
    ok = cli("train", tmp_path / "cache", *TRAIN_ARGS, "--out", tmp_path / "honest-run", "--folds-from", honest)
    assert ok.exit_code == 0 and "FLAWED" not in ok.output, ok.output
    assert not json.loads((tmp_path / "honest-run" / "config.json").read_text())["flawed"]

    with pytest.raises(CompareError, match=r"flawed is FLAWED \(speaker-dependent.*\) and .*honest-run is honest"):
        compare([str(tmp_path / "flawed"), str(tmp_path / "honest-run")])
    bad = cli("compare", tmp_path / "honest-run", tmp_path / "flawed")
    assert bad.exit_code == 1 and "is FLAWED" in bad.output and "Traceback" not in bad.output

    sweep_args = ("--layers", "1", "--heads", "linear", "--linear-c", "1", "--jobs", "1", "--device", "cpu")
    swept = cli("sweep", tmp_path / "cache", "--out", tmp_path / "sweep-flawed", *sweep_args,
                "--folds-from", overlap, "--compat-speaker-overlap")
    assert swept.exit_code == 0, swept.output
    assert "FLAWED (speaker-dependent)" in swept.output
    summary = (tmp_path / "sweep-flawed" / "summary.md").read_text()
    assert "**FLAWED (speaker-dependent):**" in summary and "speaker-dependent folds" in summary
    assert "FLAWED (speaker-dependent)" in summary.split("## ")[1].splitlines()[0]  # the panel title, so the plots
    rows = list(csv.DictReader(open(tmp_path / "sweep-flawed" / "results.csv")))
    assert rows and all(r["flawed"] == "FLAWED (speaker-dependent)" for r in rows)
    # the flawed sweep's cell and the flawed run share folds: they pair; the honest run does not
    assert compare([f"{tmp_path / 'sweep-flawed'}:1:linear", str(tmp_path / "flawed")])[0]["n"] == 3
    with pytest.raises(CompareError, match="is FLAWED"):
        compare([f"{tmp_path / 'sweep-flawed'}:1:linear", str(tmp_path / "honest-run")])

    plain = cli("sweep", tmp_path / "cache", "--out", tmp_path / "sweep-honest", *sweep_args, "--folds-from", honest)
    assert plain.exit_code == 0 and "FLAWED" not in plain.output, plain.output
    assert "flawed" not in open(tmp_path / "sweep-honest" / "results.csv").readline()
    joined = cli("report", tmp_path / "sweep-flawed", tmp_path / "sweep-honest", "--out", tmp_path / "joined")
    assert joined.exit_code == 1 and "one report never mixes them" in joined.output, joined.output
    assert np.isfinite(float(rows[0]["ua"]))
