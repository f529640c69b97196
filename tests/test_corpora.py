"""Corpus recipes on tiny synthetic corpora laid out like the real releases."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ser_cache.corpora import (CORPORA, LABEL_MAPS, RELEASES, prepare, single_speaker_labels,
                               single_speaker_warnings)
from ser_cache.corpora.iemocap import prepare_iemocap
from ser_cache.corpora.ravdess import prepare_ravdess
from ser_cache.folds import make_folds
from ser_cache.records import RecordsError, Utterance

SR = 16000
SECONDS = 0.2
REAL_RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"


def write_audio(path: Path, seconds: float = SECONDS) -> Path:
    """A short noise file (format from the suffix), creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, int(seconds * SR)).astype(np.float32)
    soundfile.write(path, noise, SR)
    return path


def by_id(records: list[Utterance]) -> dict[str, Utterance]:
    return {r.id: r for r in records}


# --- RAVDESS ------------------------------------------------------------------------------------

def make_ravdess(root: Path) -> Path:
    write_audio(root / "Actor_01" / "03-01-01-01-01-01-01.wav")  # neutral
    write_audio(root / "Actor_01" / "03-01-05-02-01-02-01.wav")  # angry, strong
    write_audio(root / "Actor_02" / "03-01-02-01-02-01-02.flac")  # calm, FLAC like ../shared
    write_audio(root / "Actor_02" / "03-01-08-02-02-02-02.flac")  # surprised
    (root / "__MACOSX" / "Actor_01").mkdir(parents=True)
    (root / "__MACOSX" / "Actor_01" / "._03-01-01-01-01-01-01.wav").write_bytes(b"\0\5\26\7")
    return root


def test_ravdess_records(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    records = by_id(prepare_ravdess(root))
    assert sorted(records) == [
        "03-01-01-01-01-01-01", "03-01-02-01-02-01-02",
        "03-01-05-02-01-02-01", "03-01-08-02-02-02-02",
    ]  # the macOS resource fork is not an utterance
    assert {i: r.label for i, r in records.items()} == {
        "03-01-01-01-01-01-01": "neutral", "03-01-02-01-02-01-02": "calm",
        "03-01-05-02-01-02-01": "angry", "03-01-08-02-02-02-02": "surprised",
    }
    assert {r.speaker for r in records.values()} == {"Actor_01", "Actor_02"}
    assert records["03-01-08-02-02-02-02"].speaker == "Actor_02"
    for r in records.values():
        assert Path(r.path).is_absolute() and Path(r.path).is_file()
        assert r.group == "" and r.original_label == r.label
        assert r.duration == pytest.approx(SECONDS, abs=1e-3)
    assert [r.id for r in prepare_ravdess(root)] == [r.id for r in prepare_ravdess(root)]


def test_ravdess_refuses_badly_named_files(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    write_audio(root / "Actor_01" / "take2.wav")
    write_audio(root / "Actor_01" / "01-01-01-01-01-01-01.wav")  # modality 01 is audio-video
    with pytest.raises(RecordsError, match=r"2 ravdess files do not follow.*01-01-01-01-01-01-01"
                                           r"\.wav.*take2\.wav.*rename or move"):
        prepare("ravdess", root)


def test_ravdess_refuses_song_files(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    write_audio(root / "Actor_01" / "03-02-03-01-01-01-01.wav")
    with pytest.raises(RecordsError, match=r"1 RAVDESS song files.*03-02-03-01-01-01-01\.wav"
                                           r".*speech part only"):
        prepare("ravdess", root)


def test_ravdess_same_stem_twice_is_a_duplicate_id(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    write_audio(root / "Actor_01" / "03-01-01-01-01-01-01.flac")
    with pytest.raises(RecordsError, match="duplicate utterance ids.*03-01-01-01-01-01-01"):
        prepare("ravdess", root)


def test_unreadable_audio_is_kept_with_zero_duration_and_reported(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    (root / "Actor_02" / "03-01-04-01-01-01-02.wav").write_bytes(b"not a wav file")
    prepared = prepare("ravdess", root)
    sad = by_id(prepared.records)["03-01-04-01-01-01-02"]
    assert sad.label == "sad" and sad.duration == 0.0
    assert "1 files have no readable header" in prepared.summary()
    assert "03-01-04-01-01-01-02" in prepared.summary()


@pytest.mark.e2e
@pytest.mark.skipif(not REAL_RAVDESS.is_dir(), reason="needs ../shared/data/ravdess")
def test_real_ravdess_speech():
    prepared = prepare("ravdess", REAL_RAVDESS)
    counts = {r.label: 0 for r in prepared.records}
    for r in prepared.records:
        counts[r.label] += 1
    assert len(prepared.records) == 1440
    assert counts == {label: 96 if label == "neutral" else 192 for label in counts}
    assert len(counts) == 8
    assert len({r.speaker for r in prepared.records}) == 24
    assert sum(r.duration for r in prepared.records) / 3600 == pytest.approx(1.48, abs=0.01)


# --- ShEMO --------------------------------------------------------------------------------------

def make_shemo(root: Path) -> Path:
    for name in ["female/F21N37", "female/F21A01", "female/F03H11",
                 "male/M13S05", "male/M13F02", "male/M02W10", "male/M02N01"]:
        write_audio(root / f"{name}.wav")
    return root


def test_shemo_records(tmp_path):
    records = by_id(prepare("shemo", make_shemo(tmp_path / "shemo")).records)
    assert {i: (r.label, r.speaker) for i, r in records.items()} == {
        "F21N37": ("neutral", "F21"), "F21A01": ("angry", "F21"), "F03H11": ("happy", "F03"),
        "M13S05": ("sad", "M13"), "M13F02": ("fearful", "M13"),  # F after digits: fearful
        "M02W10": ("surprised", "M02"), "M02N01": ("neutral", "M02"),
    }
    assert all(r.duration == pytest.approx(SECONDS, abs=1e-3) for r in records.values())


def test_shemo4_drops_and_counts_surprised_and_fearful(tmp_path):
    prepared = prepare("shemo", make_shemo(tmp_path / "shemo"), label_map="shemo4")
    assert sorted(r.label for r in prepared.records) == [
        "angry", "happy", "neutral", "neutral", "sad"]
    assert prepared.dropped == {"fearful": 1, "surprised": 1}
    assert "dropped 2 utterances" in prepared.summary()
    assert "fearful 1, surprised 1" in prepared.summary()


def test_shemo_refuses_other_names(tmp_path):
    root = make_shemo(tmp_path / "shemo")
    write_audio(root / "male" / "M13X05.wav")  # X is no ShEMO emotion
    with pytest.raises(RecordsError, match=r"1 shemo files do not follow.*M13X05\.wav"):
        prepare("shemo", root)


# --- IEMOCAP ------------------------------------------------------------------------------------

EMO_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
EVALUATORS = (
    "C-E2:\tNeutral;\t()\nC-E3:\tFrustration;\t()\nC-F1:\tNeutral;\t(curious)\n"
    "A-E3:\tval 3; act 2; dom  2;\t()\nA-F1:\tval 3; act 2; dom  1;\t()\n\n"
)
IEMOCAP_UTTERANCES = {  # utterance id -> label in its EmoEvaluation file
    "Ses01F_impro01_F000": "neu",
    "Ses01F_impro01_M000": "exc",
    "Ses01F_impro01_F001": "fru",
    "Ses01M_script01_1_F000": "hap",  # a woman speaking in the man's dialog
    "Ses01M_script01_1_M000": "sad",
    "Ses02F_impro02_M000": "ang",
    "Ses02F_impro02_F000": "sad",
    "Ses02F_impro02_F001": "xxx",
}


def iemocap_vad(k: int) -> str:
    """The [V, A, D] field of the k-th turn of a file: three different values."""
    return f"[{1.5 + 0.5 * k:.4f}, {3.0:.4f}, {4.5 - 0.5 * k:.4f}]"


def write_emo_evaluation(txt: Path, labels: dict[str, str]) -> None:
    """An EmoEvaluation file as the release writes it: header, then one block per turn."""
    txt.parent.mkdir(parents=True, exist_ok=True)
    blocks = [
        f"[{2.0 * k:.4f} - {2.0 * k + 1.5:.4f}]\t{utt}\t{label}\t{iemocap_vad(k)}\n"
        + EVALUATORS
        for k, (utt, label) in enumerate(labels.items())
    ]
    txt.write_text(EMO_HEADER + "".join(blocks), encoding="utf-8")


def make_iemocap(root: Path, utterances: dict[str, str] = IEMOCAP_UTTERANCES) -> Path:
    dialogs: dict[tuple[str, str], dict[str, str]] = {}
    for utt, label in utterances.items():
        session, dialog = f"Session{int(utt[3:5])}", utt.rsplit("_", 1)[0]
        dialogs.setdefault((session, dialog), {})[utt] = label
        write_audio(root / session / "sentences" / "wav" / dialog / f"{utt}.wav")
    for (session, dialog), labels in dialogs.items():
        emo = root / session / "dialog" / "EmoEvaluation"
        write_emo_evaluation(emo / f"{dialog}.txt", labels)
        # the release's per-evaluator folders hold other formats; they must not be read
        (emo / "Categorical").mkdir(exist_ok=True)
        (emo / "Categorical" / f"{dialog}_e2_cat.txt").write_text(
            "".join(f"{u} :Neutral; ()\n" for u in labels))
    (root / "Session1" / "sentences" / "wav" / "Ses01F_impro01" / "._Ses01F_impro01_F000.wav"
     ).write_bytes(b"\0\5\26\7")
    return root


def test_iemocap_default_map_merges_excited_into_happy(tmp_path):
    prepared = prepare("iemocap", make_iemocap(tmp_path / "IEMOCAP_full_release"))
    records = by_id(prepared.records)
    assert prepared.label_map == "iemocap4"
    assert {i: r.label for i, r in records.items()} == {
        "Ses01F_impro01_F000": "neutral",
        "Ses01F_impro01_M000": "happy",  # exc
        "Ses01M_script01_1_F000": "happy",  # hap
        "Ses01M_script01_1_M000": "sad",
        "Ses02F_impro02_M000": "angry",
        "Ses02F_impro02_F000": "sad",
    }
    assert records["Ses01F_impro01_M000"].original_label == "exc"
    assert prepared.dropped == {"fru": 1, "xxx": 1}
    summary = prepared.summary()
    assert "happy" in summary and "(exc 1 + hap 1)" in summary
    assert "dropped 2 utterances" in summary and "fru 1, xxx 1" in summary
    assert "6 utterances, 4 speakers, 2 groups" in summary


def test_iemocap_speaker_is_the_person_speaking(tmp_path):
    records = by_id(prepare("iemocap", make_iemocap(tmp_path / "iemocap"), "none").records)
    assert len(records) == len(IEMOCAP_UTTERANCES)
    assert records["Ses01F_impro01_F000"].speaker == "Ses01_F"
    assert records["Ses01F_impro01_M000"].speaker == "Ses01_M"
    assert records["Ses01M_script01_1_F000"].speaker == "Ses01_F"  # not the dialog's M
    assert records["Ses02F_impro02_M000"].speaker == "Ses02_M"
    assert {r.group for r in records.values()} == {"Session1", "Session2"}
    assert records["Ses02F_impro02_F000"].group == "Session2"
    assert all(r.duration == pytest.approx(SECONDS, abs=1e-3) for r in records.values())


def test_iemocap_without_map_keeps_every_label(tmp_path):
    prepared = prepare("iemocap", make_iemocap(tmp_path / "iemocap"), label_map="none")
    assert prepared.label_map is None and prepared.dropped == {}
    assert sorted({r.label for r in prepared.records}) == [
        "angry", "excited", "frustrated", "happy", "neutral", "no_majority", "sad"]


def test_the_recipe_keeps_every_label_and_prepare_applies_the_default_map(tmp_path):
    root = make_iemocap(tmp_path / "iemocap")
    assert {r.original_label for r in prepare_iemocap(root)} >= {"fru", "xxx"}
    prepared = prepare("iemocap", root)
    assert prepared.label_map == "iemocap4" and len(prepared.records) == 6
    assert prepared.dropped == {"fru": 1, "xxx": 1}
    assert "dropped 2 utterances whose original label is not in label map iemocap4: fru 1, xxx 1" in (
        prepared.summary())


def test_iemocap_targets_are_valence_arousal_dominance(tmp_path):
    records = by_id(prepare("iemocap", make_iemocap(tmp_path / "iemocap"), "none").records)
    # the first turn of its file ([1.5, 3.0, 4.5]), and the second of another ([2.0, 3.0, 4.0])
    assert dict(records["Ses01F_impro01_F000"].targets) == {
        "valence": 1.5, "arousal": 3.0, "dominance": 4.5}
    assert dict(records["Ses01M_script01_1_M000"].targets) == {
        "valence": 2.0, "arousal": 3.0, "dominance": 4.0}
    kept = prepare("iemocap", tmp_path / "iemocap").records  # the label map keeps the targets
    assert all(dict(r.targets) == dict(records[r.id].targets) for r in kept)


@pytest.mark.parametrize("vad", ["", "[2.5, 3.0]", "[2.5, x, 3.0]", "[nan, 2.5, 2.5]"])
def test_iemocap_names_a_line_without_a_vad_triple(tmp_path, vad):
    root = make_iemocap(tmp_path / "iemocap")
    txt = root / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    lines = txt.read_text().splitlines()
    n = next(i for i, x in enumerate(lines, 1) if "Ses01F_impro01_M000" in x and x.startswith("["))
    lines[n - 1] = lines[n - 1].rsplit("\t", 1)[0] + (f"\t{vad}" if vad else "")
    txt.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordsError, match=rf"Ses01F_impro01\.txt:{n}: expected .*\[v, a, d\]' "
                                           r"\(v, a, d numbers\)"):
        prepare("iemocap", root)


def test_iemocap_refuses_audio_without_a_label(tmp_path):
    root = make_iemocap(tmp_path / "iemocap")
    write_audio(root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M001.wav")
    with pytest.raises(RecordsError, match=r"1 IEMOCAP audio files have no label line"
                                           r".*Ses01F_impro01_M001\.wav"):
        prepare("iemocap", root)


def test_iemocap_refuses_labels_without_audio(tmp_path):
    root = make_iemocap(tmp_path / "iemocap")
    (root / "Session2/sentences/wav/Ses02F_impro02/Ses02F_impro02_F000.wav").unlink()
    with pytest.raises(RecordsError, match=r"1 labelled IEMOCAP utterances have no audio file"
                                           r".*Ses02F_impro02_F000"):
        prepare("iemocap", root)


def test_iemocap_names_a_malformed_label_line(tmp_path):
    root = make_iemocap(tmp_path / "iemocap")
    txt = root / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    txt.write_text(txt.read_text() + "[9.0 - 9.5] Ses01F_impro01_F002 neu\n")  # spaces, no tabs
    n = len(txt.read_text().splitlines())
    with pytest.raises(RecordsError, match=rf"Ses01F_impro01\.txt:{n}: expected"):
        prepare("iemocap", root)


# --- EmoDB --------------------------------------------------------------------------------------

def test_emodb_records(tmp_path):
    root = tmp_path / "emodb"
    for stem in ["03a01Fa", "03a01Wa", "10b09La", "16a05Ab", "16b10Tc", "08a02Eb", "09a07Na"]:
        write_audio(root / "wav" / f"{stem}.wav")
    (root / "lablaut").mkdir()
    (root / "lablaut" / "03a01Fa.lablaut").write_text("not audio")
    records = by_id(prepare("emodb", root).records)
    assert {i: (r.label, r.speaker) for i, r in records.items()} == {
        "03a01Fa": ("happy", "03"), "03a01Wa": ("angry", "03"), "10b09La": ("bored", "10"),
        "16a05Ab": ("fearful", "16"), "16b10Tc": ("sad", "16"), "08a02Eb": ("disgust", "08"),
        "09a07Na": ("neutral", "09"),
    }
    assert all(r.group == "" for r in records.values())


# --- CSV ----------------------------------------------------------------------------------------

def make_csv_corpus(root: Path, rows: str, name: str = "utterances.csv") -> Path:
    for rel in ["a/x.wav", "b/x.wav", "b/y.flac"]:
        write_audio(root / rel)
    csv_path = root / name
    csv_path.write_text(rows, encoding="utf-8-sig")  # with a BOM, as spreadsheets save it
    return csv_path


def test_csv_records_ids_keep_folders(tmp_path):
    make_csv_corpus(tmp_path / "c", "path,label,speaker,group\n"
                    "a/x.wav,angry,s1,g1\n./b/x.wav,happy,s2,g2\n\nb/y.flac,angry,s2,g2\n")
    records = prepare("csv", tmp_path / "c").records
    assert [r.id for r in records] == ["a/x", "b/x", "b/y"]  # same stem, different ids
    assert [r.label for r in records] == ["angry", "happy", "angry"]
    assert [(r.speaker, r.group) for r in records] == [("s1", "g1"), ("s2", "g2"), ("s2", "g2")]
    assert records[1].path == str((tmp_path / "c" / "b" / "x.wav").resolve())
    assert all(r.duration == pytest.approx(SECONDS, abs=1e-3) for r in records)


def test_csv_explicit_id_path_and_label_map(tmp_path):
    csv_path = make_csv_corpus(tmp_path / "c", "id,path,label,speaker\n"
                               "u1,a/x.wav,exc,s1\nu2,b/x.wav,fru,s2\nu3,b/y.flac,neu,s2\n",
                               name="mine.csv")
    prepared = prepare("csv", tmp_path / "elsewhere", label_map="iemocap4", csv_path=csv_path)
    assert [(r.id, r.label, r.original_label) for r in prepared.records] == [
        ("u1", "happy", "exc"), ("u3", "neutral", "neu")]
    assert prepared.dropped == {"fru": 1}
    assert [r.id for r in prepare("csv", csv_path).records] == ["u1", "u2", "u3"]  # dir = file


def test_csv_missing_column(tmp_path):
    make_csv_corpus(tmp_path / "c", "path,label\na/x.wav,angry\n")
    with pytest.raises(RecordsError, match=r"row 1: missing column\(s\) speaker.*first row must"):
        prepare("csv", tmp_path / "c")


def test_csv_empty_field(tmp_path):
    make_csv_corpus(tmp_path / "c", "path,label,speaker\na/x.wav,angry,s1\nb/x.wav, ,s2\n")
    with pytest.raises(RecordsError, match=r"row 3: the label field is empty: fill it in"):
        prepare("csv", tmp_path / "c")


def test_csv_path_outside_its_folder(tmp_path):
    write_audio(tmp_path / "outside.wav")
    make_csv_corpus(tmp_path / "c", "path,label,speaker\na/x.wav,angry,s1\n../outside.wav,sad,s2\n")
    with pytest.raises(RecordsError, match=rf"row 3: path '\.\./outside\.wav' points outside the "
                                           rf"audio root .*: pass --audio-root {tmp_path}\b"):
        prepare("csv", tmp_path / "c")


def test_csv_symlink_to_audio_elsewhere_is_followed(tmp_path):
    write_audio(tmp_path / "outside.wav")
    make_csv_corpus(tmp_path / "c", "path,label,speaker\nlink.wav,sad,s2\n")
    (tmp_path / "c" / "link.wav").symlink_to(tmp_path / "outside.wav")
    (r,) = prepare("csv", tmp_path / "c").records
    assert (r.id, r.listed_path, r.path) == ("link", "link.wav", str((tmp_path / "outside.wav").resolve()))
    assert r.duration == pytest.approx(SECONDS, abs=1e-3)


def test_csv_duplicate_ids(tmp_path):
    make_csv_corpus(tmp_path / "c", "path,label,speaker\na/x.wav,angry,s1\nb/x.wav,sad,s2\n"
                    "a/x.flac,happy,s1\n")
    with pytest.raises(RecordsError, match=r"rows 2 and 4 have the same id 'a/x'"):
        prepare("csv", tmp_path / "c")


def test_csv_too_many_fields(tmp_path):
    make_csv_corpus(tmp_path / "c", "path,label,speaker\na/x.wav,angry,s1,extra\n")
    with pytest.raises(RecordsError, match=r"row 2: 4 fields but the header names 3"):
        prepare("csv", tmp_path / "c")


def test_csv_file_missing(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(RecordsError, match=r"utterances\.csv does not exist: pass --csv"):
        prepare("csv", tmp_path / "c")


# --- errors common to every corpus ---------------------------------------------------------------

@pytest.mark.parametrize("corpus", ["ravdess", "shemo", "iemocap", "emodb", "msp-podcast"])
def test_missing_corpus_folder(tmp_path, corpus):
    with pytest.raises(RecordsError, match=rf"{corpus} corpus folder .*nowhere does not exist"):
        prepare(corpus, tmp_path / "nowhere")


@pytest.mark.parametrize("corpus", ["ravdess", "shemo", "iemocap", "emodb"])
def test_no_audio_files_names_the_layout(tmp_path, corpus):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "README.txt").write_text("audio goes here")
    with pytest.raises(RecordsError, match=rf"no audio files .* the {corpus} recipe expects \S"):
        prepare(corpus, tmp_path / "empty")


def test_unknown_label_map_lists_the_known_ones(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    with pytest.raises(RecordsError, match=r"unknown label map 'iemocap5'; known label maps: "
                                           r"iemocap4, .*ravdess-arousal, .*shemo4, or 'none'"):
        prepare("ravdess", root, label_map="iemocap5")


def test_label_map_for_another_corpus_is_refused(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    with pytest.raises(RecordsError, match=r"label map 'iemocap4' keeps none of the 4 ravdess"):
        prepare("ravdess", root, label_map="iemocap4")


def test_unknown_corpus_and_stray_csv_path(tmp_path):
    with pytest.raises(RecordsError, match=r"unknown corpus 'crema'; known corpora: ravdess"):
        prepare("crema", tmp_path)
    with pytest.raises(RecordsError, match=r"only read with corpus 'csv'"):
        prepare("ravdess", make_ravdess(tmp_path / "r"), csv_path=tmp_path / "x.csv")


def test_registry_and_maps():
    assert set(CORPORA) == {"ravdess", "shemo", "iemocap", "emodb", "msp-podcast", "csv", "emobox", "hf"}
    assert LABEL_MAPS["iemocap4"]["exc"] == LABEL_MAPS["iemocap4"]["hap"] == "happy"
    assert set(LABEL_MAPS["shemo4"].values()) == {"angry", "happy", "neutral", "sad"}


def test_every_recipe_reads_the_options_it_declares_and_defaults_to_a_known_map():
    for name, recipe in CORPORA.items():
        keywords = list(inspect.signature(recipe.prepare).parameters)[1:]  # after corpus_dir
        assert keywords == list(recipe.options), name
        assert recipe.default_label_map is None or recipe.default_label_map in LABEL_MAPS, name
    assert {n for n, r in RELEASES.items() if r.archives} == {"ravdess", "emodb", "shemo"}
    assert all(RELEASES[n] is CORPORA[n].release for n in ("ravdess", "emodb", "shemo"))


# --- speaker-independent splits ------------------------------------------------------------------

def test_labels_with_one_speaker_are_named_in_warnings(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    write_audio(root / "Actor_02" / "03-01-01-01-01-01-02.flac")  # neutral from a 2nd actor
    prepared = prepare("ravdess", root)  # calm, angry, surprised have one actor each
    assert single_speaker_labels(prepared.records) == {
        "angry": "Actor_01", "calm": "Actor_02", "surprised": "Actor_02"}
    warnings = single_speaker_warnings(prepared.records)
    assert [w.split(":")[1] for w in warnings] == [" label 'angry' has only speaker 'Actor_01'",
                                                   " label 'calm' has only speaker 'Actor_02'",
                                                   " label 'surprised' has only speaker 'Actor_02'"]
    assert all(w in prepared.summary() for w in warnings)
    neutral = [r for r in prepared.records if r.label == "neutral"]
    assert single_speaker_warnings(neutral) == []  # two speakers: fine


# --- CSV targets --------------------------------------------------------------------------------

def test_csv_numeric_columns_become_targets(tmp_path, caplog):
    make_csv_corpus(tmp_path / "c", "path,label,speaker,Arousal,valence,transcript,gender\n"
                    "a/x.wav,angry,s1,4.5,-1,hello there,f\nb/x.wav,sad,s2,1.25,2e0,,m\n")
    with caplog.at_level(logging.WARNING, logger="ser_cache.corpora"):
        records = prepare("csv", tmp_path / "c").records
    assert [dict(r.targets) for r in records] == [
        {"arousal": 4.5, "valence": -1.0}, {"arousal": 1.25, "valence": 2.0}]
    assert "transcript, gender hold no numbers and are ignored" in caplog.text
    assert "targets arousal (1.25 .. 4.5, mean 2.88), valence (-1 .. 2, mean 0.5)" in (
        prepare("csv", tmp_path / "c").summary())


def test_csv_without_extra_columns_has_no_targets(tmp_path, caplog):
    make_csv_corpus(tmp_path / "c", "path,label,speaker,group\na/x.wav,angry,s1,g1\n")
    with caplog.at_level(logging.WARNING, logger="ser_cache.corpora"):
        (r,) = prepare("csv", tmp_path / "c").records
    assert r.targets == () and "ignored" not in caplog.text


@pytest.mark.parametrize("cell, said", [("", "is empty"), ("3,5", "is '3,5', not a finite number"),
                                        ("nan", "is 'nan', not a finite number"),
                                        ("high", "is 'high', not a finite number")])
def test_csv_target_cell_that_is_no_number_names_row_and_column(tmp_path, cell, said):
    make_csv_corpus(tmp_path / "c", "path,label,speaker,arousal\na/x.wav,angry,s1,4\n"
                    f'b/x.wav,sad,s2,"{cell}"\n')
    with pytest.raises(RecordsError, match=rf"row 3, column 'arousal': the cell {said}.*fill it in"):
        prepare("csv", tmp_path / "c")


def test_csv_short_row_leaves_a_target_empty(tmp_path):
    make_csv_corpus(tmp_path / "c", "path,label,speaker,arousal\na/x.wav,angry,s1,4\nb/x.wav,sad,s2\n")
    with pytest.raises(RecordsError, match=r"row 3, column 'arousal': the cell is empty"):
        prepare("csv", tmp_path / "c")


def test_csv_column_named_twice(tmp_path):
    make_csv_corpus(tmp_path / "c", "path,label,speaker,arousal,Arousal\na/x.wav,angry,s1,4,5\n")
    with pytest.raises(RecordsError, match=r"row 1: column\(s\) arousal named twice"):
        prepare("csv", tmp_path / "c")


# --- binary and cross-corpus label maps ---------------------------------------------------------

def make_ravdess_all_emotions(root: Path) -> Path:
    """Every RAVDESS emotion once, from actor 01 (01 neutral ... 08 surprised)."""
    for emotion in range(1, 9):
        write_audio(root / "Actor_01" / f"03-01-{emotion:02d}-01-01-01-01.wav")
    return root


def labels_by_original(prepared) -> dict[str, str]:
    return {r.original_label: r.label for r in prepared.records}


def test_ravdess_arousal_is_high_or_low_for_every_emotion(tmp_path):
    prepared = prepare("ravdess", make_ravdess_all_emotions(tmp_path / "r"), "ravdess-arousal")
    assert labels_by_original(prepared) == {
        "angry": "high", "fearful": "high", "happy": "high", "surprised": "high",
        "disgust": "high", "neutral": "low", "calm": "low", "sad": "low"}
    assert prepared.dropped == {}


def test_ravdess_valence_drops_and_counts_neutral(tmp_path):
    prepared = prepare("ravdess", make_ravdess_all_emotions(tmp_path / "r"), "ravdess-valence")
    assert labels_by_original(prepared) == {
        "happy": "positive", "calm": "positive", "surprised": "positive",
        "angry": "negative", "fearful": "negative", "sad": "negative", "disgust": "negative"}
    assert prepared.dropped == {"neutral": 1}
    assert "dropped 1 utterances whose original label is not in label map ravdess-valence: " \
           "neutral 1" in prepared.summary()
    assert "negative" in prepared.summary() and "(angry 1 + disgust 1 + fearful 1 + sad 1)" \
        in prepared.summary()


def test_ravdess_and_emodb_share_six_classes(tmp_path):
    ravdess = prepare("ravdess", make_ravdess_all_emotions(tmp_path / "r"), "ravdess-emodb6")
    root = tmp_path / "emodb"
    for letter in "WLEAFTN":
        write_audio(root / "wav" / f"03a01{letter}a.wav")
    emodb = prepare("emodb", root, "ravdess-emodb6")
    six = ["angry", "disgust", "fearful", "happy", "neutral", "sad"]
    assert sorted(r.label for r in ravdess.records) == six
    assert sorted(r.label for r in emodb.records) == six
    assert ravdess.dropped == {"calm": 1, "surprised": 1}
    assert emodb.dropped == {"bored": 1}


# --- MSP-Podcast --------------------------------------------------------------------------------

MSP_HEADER = "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"
MSP_ROWS = (  # FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, Gender, Split_Set
    "MSP-PODCAST_0001_0001.wav,A,6.2,2.0,5.8,127,Male,Train\n"
    "MSP-PODCAST_0001_0002.wav,N,4.0,4.2,3.6,127,Male,Train\n"
    "MSP-PODCAST_0002_0001.wav,H,5.0,6.0,4.4,310,Female,Train\n"
    "MSP-PODCAST_0002_0002.wav,S,2.4,2.2,3.0,310,Female,Train\n"
    "MSP-PODCAST_0003_0001.wav,X,4.2,3.8,4.0,Unknown,Unknown,Train\n"
    "MSP-PODCAST_0004_0001.wav,O,3.0,4.0,4.0,Unknown,Unknown,Development\n"
    "MSP-PODCAST_0005_0001.wav,A,5.5,2.5,5.0,55,Female,Development\n"
    "MSP-PODCAST_0005_0002.wav,U,5.8,4.6,4.2,55,Female,Development\n"
    "MSP-PODCAST_0006_0001.wav,N,3.8,4.0,4.0,Unknown,Unknown,Test1\n"
    "MSP-PODCAST_0008_0001.wav,C,4.4,2.6,4.8,89,Male,Test1\n"
    "MSP-PODCAST_0007_0001.wav,S,2.0,1.6,2.2,88,Male,Test2\n"
)


def make_msp_podcast(root: Path, rows: str = MSP_ROWS) -> Path:
    for line in rows.splitlines():
        write_audio(root / "Audios" / line.split(",")[0])
    write_audio(root / "Audios" / "MSP-PODCAST_0009_0001.wav")  # Test3-like: audio, no label
    (root / "Audios" / "._MSP-PODCAST_0001_0001.wav").write_bytes(b"\0\5\26\7")
    (root / "Labels").mkdir(parents=True)
    (root / "Labels" / "labels_consensus.csv").write_text(MSP_HEADER + rows, encoding="utf-8")
    return root


def test_msp_podcast_default_map_is_four_classes_with_drops_counted(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ser_cache.corpora"):
        prepared = prepare("msp-podcast", make_msp_podcast(tmp_path / "MSP-PODCAST-Publish-1.11"))
    assert prepared.label_map == "msp-podcast4"
    assert {r.id: r.label for r in prepared.records} == {
        "MSP-PODCAST_0001_0001": "angry", "MSP-PODCAST_0001_0002": "neutral",
        "MSP-PODCAST_0002_0001": "happy", "MSP-PODCAST_0002_0002": "sad",
        "MSP-PODCAST_0005_0001": "angry", "MSP-PODCAST_0006_0001": "neutral",
        "MSP-PODCAST_0007_0001": "sad",
    }
    assert prepared.dropped == {"contempt": 1, "no_majority": 1, "other": 1, "surprised": 1}
    assert ("dropped 4 utterances whose original label is not in label map msp-podcast4: "
            "contempt 1, no_majority 1, other 1, surprised 1") in prepared.summary()
    assert "1 audio files in" in caplog.text and "MSP-PODCAST_0009_0001.wav" in caplog.text


def test_msp_podcast_targets_speakers_and_splits(tmp_path):
    records = by_id(prepare("msp-podcast", make_msp_podcast(tmp_path / "msp"), "none").records)
    assert len(records) == 11  # every labelled segment, other and no-agreement included
    r = records["MSP-PODCAST_0001_0001"]
    assert dict(r.targets) == {"arousal": 6.2, "valence": 2.0, "dominance": 5.8}
    assert (r.speaker, r.group, r.original_label) == ("127", "Train", "angry")
    assert r.path == str(tmp_path / "msp" / "Audios" / "MSP-PODCAST_0001_0001.wav")
    assert r.duration == pytest.approx(SECONDS, abs=1e-3)
    assert records["MSP-PODCAST_0003_0001"].speaker == "Unknown_Train"
    assert records["MSP-PODCAST_0004_0001"].speaker == "Unknown_Development"
    assert records["MSP-PODCAST_0006_0001"].speaker == "Unknown_Test1"
    assert {r.group for r in records.values()} == {"Train", "Development", "Test1", "Test2"}
    assert records["MSP-PODCAST_0003_0001"].label == "no_majority"
    eight = prepare("msp-podcast", tmp_path / "msp", "msp-podcast8")
    assert eight.dropped == {"no_majority": 1, "other": 1}


def test_msp_podcast_official_split_as_folds(tmp_path):
    records = prepare("msp-podcast", make_msp_podcast(tmp_path / "msp")).records
    folds = make_folds([r.id for r in records], [r.label for r in records],
                       [r.speaker for r in records], [r.group for r in records])
    assert folds.protocol == "split" and folds.n_folds == 2  # Test1, Test2
    ids = np.array([r.id for r in records])
    train, val, test = folds.split(0)
    assert sorted(ids[test]) == ["MSP-PODCAST_0006_0001"]  # Test1 after the 4-class map
    assert sorted(ids[val]) == ["MSP-PODCAST_0005_0001"]
    assert len(train) == 4 and "MSP-PODCAST_0007_0001" not in ids[train]  # Test2 never trains


@pytest.mark.parametrize("old, new, said", [
    ("0002_0001.wav,H,", "0002_0001.wav,Q,", r"row 4: EmoClass 'Q' is none of A, S, H"),
    (",5.0,6.0,4.4,", ",,6.0,4.4,", r"row 4: EmoAct '' is not a finite number"),
    (",5.0,6.0,4.4,", ",5.0,high,4.4,", r"row 4: EmoVal 'high' is not a finite number"),
    ("Female,Train\nMSP-PODCAST_0002_0002", "Female,Training\nMSP-PODCAST_0002_0002",
     r"row 4: Split_Set 'Training' is none of Train, Development"),
])
def test_msp_podcast_names_a_bad_row(tmp_path, old, new, said):
    assert old in MSP_ROWS
    root = make_msp_podcast(tmp_path / "msp", MSP_ROWS.replace(old, new, 1))
    with pytest.raises(RecordsError, match=rf"labels_consensus\.csv, {said}.*fix the row"):
        prepare("msp-podcast", root)


def test_msp_podcast_refuses_labels_without_audio(tmp_path):
    root = make_msp_podcast(tmp_path / "msp")
    (root / "Audios" / "MSP-PODCAST_0007_0001.wav").unlink()
    with pytest.raises(RecordsError, match=r"1 segments of .*labels_consensus\.csv have no audio "
                                           r"file, for example .*MSP-PODCAST_0007_0001\.wav"):
        prepare("msp-podcast", root)


def test_msp_podcast_missing_labels_or_columns(tmp_path):
    (tmp_path / "msp" / "Audios").mkdir(parents=True)
    with pytest.raises(RecordsError, match=r"labels_consensus\.csv does not exist: the "
                                           r"msp-podcast recipe expects Labels/"):
        prepare("msp-podcast", tmp_path / "msp")
    (tmp_path / "msp" / "Labels").mkdir()
    (tmp_path / "msp" / "Labels" / "labels_consensus.csv").write_text("FileName,EmoClass\n")
    with pytest.raises(RecordsError, match=r"row 1: missing column\(s\) EmoAct, EmoVal, EmoDom, "
                                           r"SpkrID, Split_Set"):
        prepare("msp-podcast", tmp_path / "msp")
