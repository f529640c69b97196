"""Corpus recipes: a raw corpus folder -> a list of `Utterance` records (records.py).

One small preparer per corpus, `prepare_<name>(corpus_dir, label_map=None)`, registered in
`CORPORA`. A preparer finds the audio files, reads the labels the corpus ships (file-name codes
or label files), reads each file's duration from its header and applies a label map. `prepare`
runs one of them for the CLI, validates the result and returns it with a printable summary.

Class names
    Each corpus's own codes are decoded by a named table (`RAVDESS_EMOTIONS`, ...) into one
    set of English names, so that a class means the same thing in every corpus: neutral, calm,
    happy, sad, angry, fearful, disgust, surprised, bored. `Utterance.original_label` keeps the
    label before any label map: that decoded name for corpora whose labels are file-name codes,
    the corpus's own word for IEMOCAP ("neu", "exc", ...), the cell as written for a CSV.

Label maps
    A label map (`LABEL_MAPS`) maps original labels to classes. Utterances whose original label
    the map does not list are dropped, counted per original label, and the counts are reported
    in the summary (never silently). `label_map=None` means the corpus's default
    (`DEFAULT_LABEL_MAPS`: iemocap4 for IEMOCAP, msp-podcast4 for MSP-Podcast, no map for
    the others); "none" keeps every label.
    Maps keyed by decoded names fit every corpus that uses them: `ravdess-arousal` (high/low)
    and `ravdess-valence` (positive/negative, neutral dropped) for RAVDESS, and
    `ravdess-emodb6` for cross-corpus work, the six classes RAVDESS and EmoDB share (angry,
    disgust, fearful, happy, neutral, sad) with the same name on both sides.

Folder layouts (CORPUS_DIR is the folder you pass; audio may be .wav or .flac at any depth unless
said otherwise; names starting with "." such as macOS "._" resource forks are not audio and are
ignored)

ravdess  RAVDESS speech: 24 actors, 8 emotions, 1440 files. Zenodo record 1188976,
         `Audio_Speech_Actors_01-24.zip` (CC BY-NC-SA 4.0; Livingstone & Russo 2018).
             CORPUS_DIR/Actor_01/03-01-05-01-02-01-01.wav
         The name is modality-channel-emotion-intensity-statement-repetition-actor. Modality must
         be 03 (audio only) and vocal channel 01 (speech): song files (channel 02, from
         `Audio_Song_Actors_01-24.zip`) are refused rather than mixed in. Speaker "Actor_01",
         no groups, id = file stem.
shemo    ShEMO, the Sharif Emotional Speech Database (Persian): 87 speakers, 3000 files, 6
         emotions. Released on GitHub by its authors (Mohamad Nezami et al. 2019).
             CORPUS_DIR/female/F21N37.wav, CORPUS_DIR/male/M13A05.wav
         The name is gender F/M, speaker number, emotion letter, utterance number. Speaker
         "F21", no groups, id = file stem. `shemo4` keeps angry, happy, neutral and sad.
iemocap  IEMOCAP: 5 sessions of 2 actors, 10039 utterances. Licensed from USC SAIL
         (sail.usc.edu/iemocap); the release is used as it unpacks:
             CORPUS_DIR/Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav
             CORPUS_DIR/Session1/dialog/EmoEvaluation/Ses01F_impro01.txt
         where a label line reads `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[...]`.
         The speaker is the session plus the gender letter of the utterance id's last part (the
         person speaking, not the one whose dialog it is): "Ses01_F". Group "Session1", id =
         utterance id. Default map `iemocap4` (excited merged into happy): 5531 utterances.
         Targets valence, arousal, dominance: the `[V, A, D]` mean ratings (1-5) of the line.
emodb    Berlin Database of Emotional Speech (German): 10 speakers, 535 files, 7 emotions.
         emodb.bilderbar.info (Burkhardt et al. 2005).
             CORPUS_DIR/wav/03a01Fa.wav
         The name is speaker (2 digits), text (3 characters), emotion letter (German initial:
         W Wut, L Langeweile, E Ekel, A Angst, F Freude, T Trauer, N neutral), version letter.
         Speaker "03", no groups, id = file stem.
msp-podcast  MSP-Podcast: podcast segments with crowd-sourced labels, over 100k segments in recent
         releases. Licensed from the MSP lab, UT Dallas (Lotfian & Busso 2019); the release is
         used as it unpacks:
             CORPUS_DIR/Labels/labels_consensus.csv
             CORPUS_DIR/Audios/MSP-PODCAST_0001_0008.wav
         The CSV's columns FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, Split_Set are
         read (others, such as Gender, are not). EmoClass letters are decoded by
         MSP_PODCAST_EMOTIONS; EmoAct, EmoVal, EmoDom (1-7) become the targets arousal,
         valence, dominance. Group = Split_Set as written (Train, Development, Test1, Test2),
         which the fold protocol `split` turns into the official partition. Speaker = SpkrID;
         "Unknown" becomes one speaker per split ("Unknown_Train"): unknown speakers may be
         anyone, so they are kept together within their split (never spread over folds) and
         never put on two sides of the split. Id = FileName without ".wav". Default map
         `msp-podcast4` (neutral, happy, sad, angry); `msp-podcast8` keeps the 8 primary
         emotions; both drop O (other) and X (no agreement), counted; `none` keeps every
         segment (what dimensional work wants). Audio without a consensus label (a test set
         whose labels are not public) is left out with a logged count.
csv      Any corpus listed in a manifest you write: a CSV file (UTF-8, a BOM is fine), or JSON
         Lines when its name ends in .jsonl (one object per line, the columns as keys). The
         fields are path, label, speaker and optionally id and group; `--columns
         path=file,label=emotion,speaker=spk_id` reads them from columns of other names.
         Paths may be absolute; relative ones start from the audio root (`--audio-root`,
         default the manifest's folder). Symlinks are followed. The id defaults to the path
         under the audio root without its extension ("a/b.wav" -> "a/b"), so a path outside
         the audio root needs an id column; ids, and so the cache's identity, do not depend on
         where the corpus lies: after moving it, point `--audio-root` at the new place.
         Records keep the path as listed (`listed_path`) beside the resolved one (`path`).
         The manifest is `--csv PATH`, or CORPUS_DIR itself when it is a file, or
         CORPUS_DIR/utterances.csv. Every other column holding numbers becomes a target of its
         name (`path,label,speaker,arousal,valence`: two targets); each of its cells must then
         be a finite number, an empty cell is refused naming its row. Columns without any
         number (a transcript) are ignored, with a logged note naming them. A group column
         holding split names (train, development, test) feeds the fold protocol `split`.
         Refused, with the row and the fix: a missing column, an empty path, label, speaker or
         id, two rows with one id or one file, a path outside the audio root without an id,
         a manifest none of whose files exists. A missing or unreadable file among others is
         kept: the summary names it, and the extractor skips it and records why.
         (The reader is manifests.py.)
emobox   A corpus as the EmoBox benchmark describes it (github.com/emo-box/EmoBox), CORPUS_DIR
         being its data/<dataset> folder (or the jsonl itself):
             CORPUS_DIR/<dataset>.jsonl  {"key": ..., "wav": "downloads/...", "emo": ..., ...}
             CORPUS_DIR/label_map.json   {"emo" value: class name}
         Id = key; the wav path starts from `--audio-root` (default CORPUS_DIR); label =
         original label = the class label_map.json names (EmoBox's spelling: "Fear",
         "Surprise"). Speakers come from the file names by the dataset's own rule (ravdess,
         emodb, shemo, iemocap as above; urdu SM5_F63_N091 -> SM5) or `--speaker-pattern`. Its
         fold_K files are read by `train --folds-from` (folds.py). The reader is emobox.py.
hf       A Hugging Face audio dataset, CORPUS_DIR being a folder written by save_to_disk, a
         .parquet or .arrow file or a folder of them, or a hub id where there is network.
             CORPUS_DIR/dataset_dict.json, CORPUS_DIR/train/data-00000-of-00001.arrow, ...
         Every split is read. The fields are those of a csv manifest, `--columns` mapping them
         (path = the audio column, by default the one of feature Audio); a ClassLabel column
         reads as its names. Id = the id column, else "<split>/<row>". The audio is decoded
         from the dataset at its own rate. The reader is hfdatasets.py.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from .audio import audio_duration, audio_exists
from .corpus_names import EMODB_NAME, IEMOCAP_ID, RAVDESS_NAME, SHEMO_NAME
from .emobox import find_jsonl, read_emobox
from .manifests import as_number, audio_folder, find_manifest, read_manifest_records
from .records import RecordsError, Utterance, class_counts, listing, target_names, validate

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")
NO_MAP = "none"  # the label-map name that keeps every label as it is

# --- label tables: corpus codes -> class names ----------------------------------------------

RAVDESS_EMOTIONS = {
    "01": "neutral", "02": "calm", "03": "happy", "04": "sad",
    "05": "angry", "06": "fearful", "07": "disgust", "08": "surprised",
}
SHEMO_EMOTIONS = {
    "A": "angry", "H": "happy", "N": "neutral", "S": "sad", "W": "surprised", "F": "fearful",
}
EMODB_EMOTIONS = {  # German initials: Wut, Langeweile, Ekel, Angst, Freude, Trauer, neutral
    "W": "angry", "L": "bored", "E": "disgust", "A": "fearful",
    "F": "happy", "T": "sad", "N": "neutral",
}
IEMOCAP_EMOTIONS = {  # the labels of EmoEvaluation files, with --label-map none
    "neu": "neutral", "hap": "happy", "exc": "excited", "sad": "sad", "ang": "angry",
    "fru": "frustrated", "sur": "surprised", "fea": "fearful", "dis": "disgust",
    "oth": "other", "xxx": "no_majority",  # xxx: no label had a majority of evaluators
}
MSP_PODCAST_EMOTIONS = {  # EmoClass of labels_consensus.csv
    "A": "angry", "S": "sad", "H": "happy", "U": "surprised", "F": "fearful",
    "D": "disgust", "C": "contempt", "N": "neutral",
    "O": "other", "X": "no_majority",  # X: the annotators agreed on no class, as IEMOCAP's xxx
}

# Named label maps: original label -> class. Original labels not listed are dropped (counted).
LABEL_MAPS: dict[str, dict[str, str]] = {
    # the 4-class IEMOCAP benchmark: excited merged into happy (5531 utterances)
    "iemocap4": {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"},
    # the 4-class ShEMO benchmark; keys are decoded names, so it fits RAVDESS and EmoDB too
    "shemo4": {"angry": "angry", "happy": "happy", "neutral": "neutral", "sad": "sad"},
    # RAVDESS's 8 emotions as binary arousal and valence; neutral has no valence side: dropped
    "ravdess-arousal": {
        "angry": "high", "fearful": "high", "happy": "high", "surprised": "high",
        "disgust": "high", "neutral": "low", "calm": "low", "sad": "low",
    },
    "ravdess-valence": {
        "happy": "positive", "calm": "positive", "surprised": "positive",
        "angry": "negative", "fearful": "negative", "sad": "negative", "disgust": "negative",
    },
    # cross-corpus RAVDESS <-> EmoDB: the six classes both have (RAVDESS drops calm and
    # surprised, EmoDB drops bored). One map for both corpora, so both sides of a cross-corpus
    # run have the same classes by construction.
    "ravdess-emodb6": {c: c for c in ("angry", "disgust", "fearful", "happy", "neutral", "sad")},
    # MSP-Podcast's common 4-class setting, and the 8 primary emotions (other and
    # no-agreement dropped)
    "msp-podcast4": {c: c for c in ("angry", "happy", "neutral", "sad")},
    "msp-podcast8": {MSP_PODCAST_EMOTIONS[c]: MSP_PODCAST_EMOTIONS[c] for c in "ASHUFDCN"},
}
# corpora not listed keep every label by default
DEFAULT_LABEL_MAPS = {"iemocap": "iemocap4", "msp-podcast": "msp-podcast4"}


# --- shared helpers ---------------------------------------------------------------------------


def corpus_folder(corpus_dir: Path, corpus: str, layout: str) -> Path:
    """The corpus folder as an absolute path, or RecordsError when it is not a folder."""
    corpus_dir = Path(corpus_dir).expanduser().absolute()
    if not corpus_dir.is_dir():
        raise RecordsError(
            f"{corpus} corpus folder {corpus_dir} does not exist (or is not a folder): "
            f"pass the folder that holds {layout}"
        )
    return corpus_dir


def find_audio(folder: Path, corpus: str, layout: str) -> list[Path]:
    """Every .wav/.flac file under `folder`, sorted; RecordsError when there are none."""
    # os.walk with followlinks: corpora are often assembled from symlinked folders, which
    # Path.rglob does not enter.
    files = sorted(
        Path(root) / name
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
        if Path(name).suffix.lower() in AUDIO_SUFFIXES and not name.startswith(".")
        and (Path(root) / name).is_file()
    )
    if not files:
        raise RecordsError(
            f"no audio files (.wav or .flac) found under {folder}: the {corpus} recipe "
            f"expects {layout}"
        )
    return files



def refuse_unmatched(bad: list[Path], corpus: str, scheme: str) -> None:
    """RecordsError naming the files whose names do not follow the corpus's naming scheme."""
    if bad:
        raise RecordsError(
            f"{len(bad)} {corpus} files do not follow its naming scheme {scheme}: "
            f"{listing(bad)}; rename or move them out of the corpus folder"
        )


def resolve_label_map(
    corpus: str, label_map: str | None
) -> tuple[str | None, dict[str, str] | None]:
    """(name, table) of the map to apply; (None, None) keeps every label.

    None picks the corpus's default from DEFAULT_LABEL_MAPS; "none" keeps every label.
    """
    name = DEFAULT_LABEL_MAPS.get(corpus) if label_map is None else label_map
    if name is None or name.lower() == NO_MAP:
        return None, None
    if name not in LABEL_MAPS:
        raise RecordsError(
            f"unknown label map {name!r}; known label maps: {', '.join(sorted(LABEL_MAPS))}, "
            f"or {NO_MAP!r} to keep every label"
        )
    return name, LABEL_MAPS[name]


def apply_label_map(
    records: Iterable[Utterance], table: dict[str, str] | None
) -> tuple[list[Utterance], dict[str, int]]:
    """(kept records relabelled by `table`, dropped count per original label).

    A record is looked up by its original label; one the table does not list is dropped.
    With no table every record is kept as it is.
    """
    records = list(records)
    if table is None:
        return records, {}
    kept, dropped = [], Counter()
    for r in records:
        if r.original_label in table:
            kept.append(replace(r, label=table[r.original_label]))
        else:
            dropped[r.original_label] += 1
    return kept, dict(sorted(dropped.items()))


def map_labels(
    records: list[Utterance], corpus: str, label_map: str | None
) -> tuple[str | None, list[Utterance], dict[str, int]]:
    """(map name, kept records, dropped per original label); RecordsError if none are kept."""
    name, table = resolve_label_map(corpus, label_map)
    kept, dropped = apply_label_map(records, table)
    if records and not kept:
        seen = sorted({r.original_label for r in records})
        raise RecordsError(
            f"label map {name!r} keeps none of the {len(records)} {corpus} utterances: it maps "
            f"{sorted(table)}, the corpus has {seen}; pick a map for this corpus "
            f"({', '.join(sorted(LABEL_MAPS))}) or {NO_MAP!r}"
        )
    return name, kept, dropped


def mapped(records: list[Utterance], corpus: str, label_map: str | None) -> list[Utterance]:
    """Validated records after the label map, drops logged: the last step of every preparer."""
    validate(records)
    name, kept, dropped = map_labels(records, corpus, label_map)
    if dropped:
        log.warning("label map %s dropped %d %s utterances: %s", name, sum(dropped.values()),
                    corpus, ", ".join(f"{k} {n}" for k, n in dropped.items()))
    return kept


# --- the corpora ------------------------------------------------------------------------------

RAVDESS_LAYOUT = "Actor_XX/03-01-EE-II-SS-RR-AA.wav (or .flac), from Audio_Speech_Actors_01-24.zip"


def prepare_ravdess(corpus_dir: Path, label_map: str | None = None) -> list[Utterance]:
    """RAVDESS speech: id = file stem, speaker "Actor_AA", 8 classes, no groups."""
    corpus_dir = corpus_folder(corpus_dir, "ravdess", RAVDESS_LAYOUT)
    records, bad, songs = [], [], []
    for path in find_audio(corpus_dir, "ravdess", RAVDESS_LAYOUT):
        m = RAVDESS_NAME.fullmatch(path.stem)
        if not m or m[1] != "03" or m[2] not in ("01", "02") or m[3] not in RAVDESS_EMOTIONS:
            bad.append(path)
            continue
        if m[2] == "02":
            songs.append(path)
            continue
        label = RAVDESS_EMOTIONS[m[3]]
        records.append(Utterance(
            id=path.stem, path=str(path), label=label, speaker=f"Actor_{m[7]}",
            duration=audio_duration(path), original_label=label,
        ))
    refuse_unmatched(bad, "ravdess", "03-01-EE-II-SS-RR-AA (modality 03 audio-only, "
                     "vocal channel 01 speech, emotion 01-08)")
    if songs:
        raise RecordsError(
            f"{len(songs)} RAVDESS song files (vocal channel 02) found, for example "
            f"{listing(songs, 2)}; this recipe prepares the speech part only: move the song files "
            "out of the corpus folder, or list the files you want in a CSV (--corpus csv)"
        )
    return mapped(records, "ravdess", label_map)


SHEMO_LAYOUT = "female/F21N37.wav and male/M13A05.wav (gender, speaker, emotion letter, number)"


def prepare_shemo(corpus_dir: Path, label_map: str | None = None) -> list[Utterance]:
    """ShEMO: id = file stem ("F21N37"), speaker = gender + number ("F21"), 6 classes."""
    records = records_from_names(
        corpus_dir, "shemo", SHEMO_LAYOUT, SHEMO_NAME,
        "F21N37 (gender F/M, speaker number, emotion letter "
        f"{'/'.join(SHEMO_EMOTIONS)}, utterance number)",
        lambda m: (SHEMO_EMOTIONS[m[3]], m[1] + m[2]),
    )
    return mapped(records, "shemo", label_map)


def records_from_names(corpus_dir: Path, corpus: str, layout: str, pattern: re.Pattern, scheme: str,
                       label_and_speaker) -> list[Utterance]:
    """Records of a corpus that spells label and speaker in its file names.

    label_and_speaker(match) -> (label, speaker) for a file stem that fully matches `pattern`;
    files that do not match are refused together, with `scheme` in the message.
    """
    corpus_dir = corpus_folder(corpus_dir, corpus, layout)
    records, bad = [], []
    for path in find_audio(corpus_dir, corpus, layout):
        m = pattern.fullmatch(path.stem)
        if not m:
            bad.append(path)
            continue
        label, speaker = label_and_speaker(m)
        records.append(Utterance(
            id=path.stem, path=str(path), label=label, speaker=speaker,
            duration=audio_duration(path), original_label=label,
        ))
    refuse_unmatched(bad, corpus, scheme)
    return records


EMODB_LAYOUT = "wav/03a01Fa.wav (speaker, text, emotion letter, version)"


def prepare_emodb(corpus_dir: Path, label_map: str | None = None) -> list[Utterance]:
    """EmoDB: id = file stem ("03a01Fa"), speaker = its first two digits ("03"), 7 classes."""
    records = records_from_names(
        corpus_dir, "emodb", EMODB_LAYOUT, EMODB_NAME,
        "03a01Fa (speaker 2 digits, text 3 characters, emotion letter "
        f"{'/'.join(EMODB_EMOTIONS)}, version letter)",
        lambda m: (EMODB_EMOTIONS[m[3]], m[1]),
    )
    return mapped(records, "emodb", label_map)


IEMOCAP_LAYOUT = ("SessionN/sentences/wav/<dialog>/<utterance>.wav with labels in "
                  "SessionN/dialog/EmoEvaluation/<dialog>.txt")


IEMOCAP_DIMENSIONS = ("valence", "arousal", "dominance")  # the order of [V, A, D] in the files


def read_vad(cell: str) -> dict[str, float] | None:
    """{"valence", "arousal", "dominance"} from "[2.5000, 3.0000, 2.5000]", None if malformed."""
    cell = cell.strip()
    if not (cell.startswith("[") and cell.endswith("]")):
        return None
    values = [as_number(v) for v in cell[1:-1].split(",")]
    if len(values) != 3 or any(v is None or not math.isfinite(v) for v in values):
        return None
    return dict(zip(IEMOCAP_DIMENSIONS, values))


def read_iemocap_labels(corpus_dir: Path) -> dict[str, tuple[str, dict[str, float]]]:
    """Utterance id -> (label, {valence, arousal, dominance}) from every
    SessionN/dialog/EmoEvaluation/*.txt.

    Only lines starting with "[" are labels: `[start - end]<TAB>id<TAB>label<TAB>[v, a, d]`,
    the last field being the evaluators' mean ratings on IEMOCAP's 1-5 scales; the header and
    the per-evaluator lines ("C-E2:", "A-E3:") are skipped.
    """
    labels, where = {}, {}
    for txt in sorted(corpus_dir.glob("Session*/dialog/EmoEvaluation/*.txt")):
        if txt.name.startswith("."):
            continue
        for n, line in enumerate(txt.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.startswith("["):
                continue
            parts = line.split("\t")
            vad = read_vad(parts[3]) if len(parts) >= 4 else None
            if vad is None or not IEMOCAP_ID.fullmatch(parts[1].strip()):
                raise RecordsError(
                    f"{txt}:{n}: expected '[start - end]<TAB>Ses01F_impro01_F000<TAB>label"
                    f"<TAB>[v, a, d]' (v, a, d numbers), got {line!r}: fix or remove the line"
                )
            utt, label = parts[1].strip(), parts[2].strip()
            if label not in IEMOCAP_EMOTIONS:
                raise RecordsError(f"{txt}:{n}: unknown IEMOCAP label {label!r} for {utt}; "
                                   f"known: {', '.join(IEMOCAP_EMOTIONS)}")
            if utt in labels:
                raise RecordsError(f"{txt}:{n}: {utt} is labelled twice (also at {where[utt]}): "
                                   "keep one line")
            labels[utt], where[utt] = (label, vad), f"{txt}:{n}"
    return labels


def prepare_iemocap(corpus_dir: Path, label_map: str | None = None) -> list[Utterance]:
    """IEMOCAP: id = utterance id, speaker "Ses01_F", group "Session1"; default map iemocap4;
    targets valence, arousal, dominance (1-5)."""
    corpus_dir = corpus_folder(corpus_dir, "iemocap", IEMOCAP_LAYOUT)
    wavs = [p for p in find_audio(corpus_dir, "iemocap", IEMOCAP_LAYOUT)
            if p.relative_to(corpus_dir).parts[1:3] == ("sentences", "wav")]
    if not wavs:
        raise RecordsError(f"no audio files under {corpus_dir}/Session*/sentences/wav: the "
                           f"iemocap recipe expects {IEMOCAP_LAYOUT}")
    labels = read_iemocap_labels(corpus_dir)
    unlabelled = [p for p in wavs if p.stem not in labels]
    if unlabelled:
        raise RecordsError(
            f"{len(unlabelled)} IEMOCAP audio files have no label line in "
            f"SessionN/dialog/EmoEvaluation/<dialog>.txt: {listing(unlabelled)}; "
            "restore the EmoEvaluation files from the release or remove the audio"
        )
    silent = sorted(set(labels) - {p.stem for p in wavs})
    if silent:
        raise RecordsError(
            f"{len(silent)} labelled IEMOCAP utterances have no audio file, for example "
            f"{listing(silent)}: expected SessionN/sentences/wav/<dialog>/<utterance>.wav; "
            "the copy of the release looks incomplete"
        )
    records = []
    for path in wavs:
        utt = path.stem
        m = IEMOCAP_ID.fullmatch(utt)  # read_iemocap_labels has checked every labelled id
        label, vad = labels[utt]
        records.append(Utterance(
            id=utt, path=str(path), label=IEMOCAP_EMOTIONS[label],
            speaker=f"Ses{m[1]}_{m[2]}", group=f"Session{int(m[1])}",
            duration=audio_duration(path), original_label=label, targets=vad,
        ))
    return mapped(records, "iemocap", label_map)


MSP_PODCAST_LAYOUT = "Labels/labels_consensus.csv and Audios/<FileName>, as the release unpacks"
MSP_PODCAST_LABELS = "Labels/labels_consensus.csv"
MSP_PODCAST_AUDIO = "Audios"
MSP_PODCAST_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Split_Set")
MSP_PODCAST_TARGETS = {"arousal": "EmoAct", "valence": "EmoVal", "dominance": "EmoDom"}
MSP_PODCAST_SPLIT = re.compile(r"Train|Development|Test\d+")
MSP_PODCAST_UNKNOWN = "unknown"  # SpkrID of segments whose speaker is not identified (any case)


def msp_podcast_row(cells: dict[str, str], n: int, labels_csv: Path,
                    audio_dir: Path) -> Utterance:
    """One row of labels_consensus.csv (row n, the header being row 1) -> an Utterance whose
    duration is left at 0.0 (read once the file is known to exist)."""
    def refuse(what: str) -> RecordsError:
        return RecordsError(f"{labels_csv}, row {n}: {what}; fix the row or restore the file "
                            "from the release")

    name, code, split = cells["FileName"], cells["EmoClass"], cells["Split_Set"]
    if not name:
        raise refuse("FileName is empty")
    if code not in MSP_PODCAST_EMOTIONS:
        raise refuse(f"EmoClass {code!r} is none of {', '.join(MSP_PODCAST_EMOTIONS)}")
    if not MSP_PODCAST_SPLIT.fullmatch(split):
        raise refuse(f"Split_Set {split!r} is none of Train, Development, Test1, Test2, ...")
    targets = {}
    for target, column in MSP_PODCAST_TARGETS.items():
        value = as_number(cells[column])
        if value is None or not math.isfinite(value):
            raise refuse(f"{column} {cells[column]!r} is not a finite number")
        targets[target] = value
    speaker = cells["SpkrID"]
    if not speaker or speaker.lower() == MSP_PODCAST_UNKNOWN:
        speaker = f"Unknown_{split}"
    label = MSP_PODCAST_EMOTIONS[code]
    path = audio_dir / (name if Path(name).suffix else f"{name}.wav")
    return Utterance(
        id=Path(name).stem, path=str(path), label=label, speaker=speaker, group=split,
        original_label=label, targets=targets,
    )


def prepare_msp_podcast(corpus_dir: Path, label_map: str | None = None) -> list[Utterance]:
    """MSP-Podcast: id = FileName stem, speaker = SpkrID, group = Split_Set, targets arousal,
    valence, dominance (1-7); default map msp-podcast4."""
    corpus_dir = corpus_folder(corpus_dir, "msp-podcast", MSP_PODCAST_LAYOUT)
    labels_csv, audio_dir = corpus_dir / MSP_PODCAST_LABELS, corpus_dir / MSP_PODCAST_AUDIO
    for needed in (labels_csv, audio_dir):
        if not needed.exists():
            raise RecordsError(f"{needed} does not exist: the msp-podcast recipe expects "
                               f"{MSP_PODCAST_LAYOUT}; pass the release folder that holds "
                               f"{MSP_PODCAST_LABELS} and {MSP_PODCAST_AUDIO}/")
    # one listing instead of a stat per row: the release has over 100k files in one folder
    present = {e.name for e in os.scandir(audio_dir) if e.is_file() and not e.name.startswith(".")}
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in MSP_PODCAST_COLUMNS if c not in header]
        if missing:
            raise RecordsError(f"{labels_csv}, row 1: missing column(s) {', '.join(missing)} "
                               f"(header is {header}): use labels_consensus.csv of the release")
        rows = [(n, {k: v.strip() for k, v in zip(header, cells)})
                for n, cells in enumerate(reader, 2) if any(c.strip() for c in cells)]
    records, absent, listed = [], [], set()
    for n, cells in rows:
        cells = {c: cells.get(c, "") for c in MSP_PODCAST_COLUMNS}
        r = msp_podcast_row(cells, n, labels_csv, audio_dir)
        listed.add(Path(r.path).name)
        if Path(r.path).name not in present:
            absent.append(r.path)
            continue
        records.append(replace(r, duration=audio_duration(Path(r.path))))
    if absent:
        raise RecordsError(
            f"{len(absent)} segments of {labels_csv} have no audio file, for example "
            f"{listing(absent)}; the copy of the release looks incomplete: restore "
            f"{MSP_PODCAST_AUDIO}/ from it"
        )
    unlabelled = sorted(n for n in present - listed if Path(n).suffix.lower() in AUDIO_SUFFIXES)
    if unlabelled:
        log.warning("%d audio files in %s have no row in %s and are left out (a test set whose "
                    "labels are not public?): %s", len(unlabelled), audio_dir, MSP_PODCAST_LABELS,
                    listing(unlabelled))
    if not records:
        raise RecordsError(f"{labels_csv} has a header but no rows: restore it from the release")
    return mapped(records, "msp-podcast", label_map)


def prepare_csv(corpus_dir: Path, label_map: str | None = None, csv_path: Path | None = None,
                audio_root: Path | None = None, columns: str | None = None) -> list[Utterance]:
    """Any corpus from a manifest (CSV, or JSON Lines by suffix) with the fields path, label,
    speaker[, id][, group][, numeric targets...], named as --columns maps them (manifests.py)."""
    return mapped(read_manifest_records(corpus_dir, csv_path, audio_root, columns), "csv", label_map)


def prepare_emobox(corpus_dir: Path, label_map: str | None = None, audio_root: Path | None = None,
                   speaker_pattern: str | None = None) -> list[Utterance]:
    """EmoBox metadata, data/<dataset>/<dataset>.jsonl with its label_map.json (emobox.py):
    id = key, label as EmoBox's label map names it, speaker from the file name."""
    return mapped(read_emobox(corpus_dir, audio_root, speaker_pattern), "emobox", label_map)


def prepare_hf(corpus_dir, label_map: str | None = None, columns: str | None = None) -> list[Utterance]:
    """A Hugging Face audio dataset, every split (hfdatasets.py): fields as a csv manifest's,
    named as --columns maps them; audio read from the dataset."""
    from .hfdatasets import read_hf_records  # imports `datasets`, which only this corpus needs

    return mapped(read_hf_records(corpus_dir, columns), "hf", label_map)


CORPORA: dict[str, Callable[..., list[Utterance]]] = {
    "ravdess": prepare_ravdess,
    "shemo": prepare_shemo,
    "iemocap": prepare_iemocap,
    "emodb": prepare_emodb,
    "msp-podcast": prepare_msp_podcast,
    "csv": prepare_csv,
    "emobox": prepare_emobox,
    "hf": prepare_hf,
}


# --- checks and the entry point ---------------------------------------------------------------

def single_speaker_labels(records: Iterable[Utterance]) -> dict[str, str]:
    """Label -> its only speaker, for every label spoken by one speaker alone."""
    speakers = defaultdict(set)
    for r in records:
        speakers[r.label].add(r.speaker)
    return {label: next(iter(s)) for label, s in sorted(speakers.items()) if len(s) == 1}


def single_speaker_warnings(records: Iterable[Utterance]) -> list[str]:
    """One warning line per label spoken by one speaker alone.

    A warning, not an error: such a corpus (one actor's recordings, say) is still worth
    extracting; it is training, whose speaker-independent folds cannot test these labels,
    that refuses it (folds.py).
    """
    return [f"warning: label {label!r} has only speaker {speaker!r}: speaker-independent folds cannot "
            "test it (training will refuse it; extraction goes on)"
            for label, speaker in single_speaker_labels(records).items()]


@dataclass
class PreparedCorpus:
    """A prepared corpus: its records and what preparing it did.

    label_map: the name of the map applied, or None when every label was kept.
    dropped: original label -> utterances the label map dropped.
    """

    corpus: str
    corpus_dir: Path
    label_map: str | None
    records: list[Utterance]
    dropped: dict[str, int] = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # where the records come from (`corpus_source`)

    def summary(self, warnings: bool = True) -> str:
        """A few lines for the CLI: targets and their ranges, per-class counts after mapping,
        drops, and (unless `warnings` is False: check-corpus lists them as problems) warnings
        about missing or unreadable files and classes of one speaker."""
        rs = self.records
        speakers = {r.speaker for r in rs}
        groups = {r.group for r in rs if r.group}
        hours = sum(r.duration for r in rs) / 3600
        lines = [
            f"{self.corpus} ({self.corpus_dir}): {len(rs)} utterances, {len(speakers)} speakers"
            + (f", {len(groups)} groups" if groups else "")
            + f", {hours:.2f} h, label map {self.label_map or NO_MAP}"
        ]
        names = target_names(rs)
        if names:
            values = {name: [dict(r.targets)[name] for r in rs] for name in names}
            lines.append("targets " + ", ".join(
                f"{name} ({min(v):g} .. {max(v):g}, mean {sum(v) / len(v):.3g})"
                for name, v in values.items()))
        sources = defaultdict(Counter)
        for r in rs:
            sources[r.label][r.original_label] += 1
        for label, n in class_counts(rs).items():
            merged = sources[label]
            from_ = (" (" + " + ".join(f"{k} {v}" for k, v in sorted(merged.items())) + ")"
                     if len(merged) > 1 else "")
            lines.append(f"  {label:<12} {n:6d}{from_}")
        if self.dropped:
            lines.append(
                f"dropped {sum(self.dropped.values())} utterances whose original label is not "
                f"in label map {self.label_map}: "
                + ", ".join(f"{k} {n}" for k, n in self.dropped.items())
            )
        if not warnings:
            return "\n".join(lines)
        silent = [r for r in rs if r.duration <= 0]
        exists = {r.id: audio_exists(r.path) for r in silent}
        missing = [r.id for r in silent if not exists[r.id]]
        if missing:
            what, fix = (("examples hold no audio", "save the dataset with its audio embedded")
                         if self.corpus == "hf" else ("files do not exist", "fix their paths, or --audio-root"))
            lines.append(f"warning: {len(missing)} {what} (the extractor will skip and record "
                         f"them; {fix}): {listing(missing)}")
        unreadable = [r.id for r in silent if exists[r.id]]
        if unreadable:
            lines.append(f"warning: {len(unreadable)} files have no readable header (duration "
                         f"0.0; the extractor will skip them): {listing(unreadable)}")
        lines += single_speaker_warnings(rs)
        return "\n".join(lines)


# The options only --corpus csv reads: prepare's keyword -> the CLI option, for messages.
# The options only some corpora read: prepare's keyword -> (the CLI option, the corpora reading it).
CORPUS_OPTIONS = {
    "csv_path": ("--csv", ("csv",)),
    "audio_root": ("--audio-root", ("csv", "emobox")),
    "columns": ("--columns", ("csv", "hf")),
    "speaker_pattern": ("--speaker-pattern", ("emobox",)),
}


def file_size(path: str) -> int:
    """Bytes of the file at `path` (symlinks followed); 0 when there is none."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def refuse_foreign_options(corpus: str, extra: dict) -> None:
    """RecordsError for options (CORPUS_OPTIONS) that `corpus` does not read, naming the corpora
    that do."""
    foreign = [k for k in extra if corpus not in CORPUS_OPTIONS[k][1]]
    if not foreign:
        return
    given = ", ".join(CORPUS_OPTIONS[k][0] for k in foreign)
    readers = [c for c in CORPORA if all(c in CORPUS_OPTIONS[k][1] for k in foreign)]
    if not readers:
        raise RecordsError(f"{given}: no corpus reads all of these, and {corpus!r} none: drop them")
    raise RecordsError(f"{given}: only read with corpus {' or '.join(repr(c) for c in readers)}, not "
                       f"{corpus!r}: drop {given} or use --corpus {' or '.join(readers)}")


def prepare(corpus: str, corpus_dir: Path, label_map: str | None = None,
            csv_path: Path | None = None, audio_root: Path | None = None,
            columns: str | None = None, speaker_pattern: str | None = None) -> PreparedCorpus:
    """Prepare `corpus` from `corpus_dir`: records after the label map, with each file's size,
    validated, summarised.

    label_map: a name in LABEL_MAPS, "none" to keep every label, or None for the corpus's
    default. csv_path: only for corpus "csv" (see `prepare_csv`); columns: for "csv" and "hf";
    audio_root: for "csv" and "emobox"; speaker_pattern: only for "emobox" (see
    `prepare_emobox`).
    """
    if corpus not in CORPORA:
        raise RecordsError(f"unknown corpus {corpus!r}; known corpora: {', '.join(CORPORA)}")
    extra = {k: v for k, v in dict(csv_path=csv_path, audio_root=audio_root, columns=columns,
                                   speaker_pattern=speaker_pattern).items() if v is not None}
    refuse_foreign_options(corpus, extra)
    resolve_label_map(corpus, label_map)  # refuse an unknown map name before scanning the corpus
    everything = CORPORA[corpus](corpus_dir, label_map=NO_MAP, **extra)
    name, records, dropped = map_labels(everything, corpus, label_map)
    records = [r if r.size else replace(r, size=file_size(r.path)) for r in records]  # hf: read with the audio
    validate(records)
    source = corpus_source(corpus, corpus_dir, name, everything, **extra)
    return PreparedCorpus(corpus, Path(source["data"]), name, records, dropped, source)


def corpus_source(corpus: str, corpus_dir: Path, label_map: str | None, records: list[Utterance],
                  csv_path: Path | None = None, audio_root: Path | None = None, columns: str | None = None,
                  speaker_pattern: str | None = None) -> dict:
    """Where a prepared corpus comes from, for the cache's provenance and `inspect`.

    data: DATA_DIR as an absolute path (a hub id for a hub dataset); manifest (csv, emobox):
    the file read; audio_root (csv, emobox): the folder relative paths started from; columns:
    --columns as given (other fields come from columns of their own name); hf: the examples
    per split and the audio column(s); label_map; speaker_pattern (emobox) when given.
    records: the records before the label map.
    """
    data = Path(corpus_dir).expanduser()
    source = {"corpus": corpus, "data": str(data.absolute())}
    if corpus in ("csv", "emobox"):
        manifest = find_manifest(corpus_dir, csv_path) if corpus == "csv" else find_jsonl(corpus_dir)
        source.update(manifest=str(manifest), audio_root=str(audio_folder(audio_root, manifest)))
    if corpus == "hf":
        from .hfdatasets import RowRef, dataset_location

        refs = [RowRef.parse(r.path) for r in records]
        source.update(data=dataset_location(corpus_dir), splits=dict(Counter(ref.split for ref in refs)),
                      audio_columns=sorted({ref.column for ref in refs}))
    if columns:
        source["columns"] = columns
    source["label_map"] = label_map or NO_MAP
    if speaker_pattern:
        source["speaker_pattern"] = speaker_pattern
    return source


def source_text(source: dict) -> list[str]:
    """`corpus_source`'s dict as the lines `inspect` prints (empty for caches made before it
    was recorded)."""
    if not source:
        return []
    if source["corpus"] == "hf":
        splits = ", ".join(f"{name} {n}" for name, n in source["splits"].items())
        lines = [f"dataset {source['data']} (splits {splits}; audio column {', '.join(source['audio_columns'])})"]
    elif "manifest" in source:
        lines = [f"manifest {source['manifest']}", f"audio root {source['audio_root']}"]
    else:
        lines = [f"folder {source['data']}"]
    if "columns" in source:
        lines.append(f"columns {source['columns']} (other fields from columns of their own name)")
    if "speaker_pattern" in source:
        lines.append(f"speaker pattern {source['speaker_pattern']!r}")
    lines.append(f"label map {source['label_map']}")
    return lines
