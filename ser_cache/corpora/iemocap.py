"""IEMOCAP: 5 sessions of 2 actors, 10039 utterances (Busso et al. 2008).

Where to get it: licensed from USC SAIL (sail.usc.edu/iemocap); the release is used as it
unpacks. Layout (CORPUS_DIR is the folder you pass; .wav or .flac):

    CORPUS_DIR/Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav
    CORPUS_DIR/Session1/dialog/EmoEvaluation/Ses01F_impro01.txt

where a label line reads `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[...]`.
The speaker is the session plus the gender letter of the utterance id's last part (the person
speaking, not the one whose dialog it is): "Ses01_F". Group "Session1", id = utterance id.
The original label is IEMOCAP's own word ("neu", "exc", ...). Default map `iemocap4` (excited
merged into happy): 5531 utterances. Targets valence, arousal, dominance: the `[V, A, D]` mean
ratings (1-5) of the line.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..audio import audio_duration
from ..manifests import as_number
from ..records import RecordsError, Utterance, listing
from .base import Recipe, SpeakerRule, corpus_folder, find_audio

LAYOUT = ("SessionN/sentences/wav/<dialog>/<utterance>.wav with labels in "
          "SessionN/dialog/EmoEvaluation/<dialog>.txt")
# the session, the speaking actor's gender: Ses01F_impro01_F000
IEMOCAP_ID = re.compile(r"Ses(\d\d)[FM]_.+_([FM])\d+")
IEMOCAP_SPEAKER = SpeakerRule(IEMOCAP_ID, lambda m: f"Ses{m[1]}_{m[2]}",
                              "Ses01F_impro01_M000 -> Ses01_M (the speaking actor)")
DIMENSIONS = ("valence", "arousal", "dominance")  # the order of [V, A, D] in the files

IEMOCAP_EMOTIONS = {  # the labels of EmoEvaluation files, with --label-map none
    "neu": "neutral", "hap": "happy", "exc": "excited", "sad": "sad", "ang": "angry",
    "fru": "frustrated", "sur": "surprised", "fea": "fearful", "dis": "disgust",
    "oth": "other", "xxx": "no_majority",  # xxx: no label had a majority of evaluators
}

IEMOCAP_MAPS = {
    # the 4-class IEMOCAP benchmark: excited merged into happy (5531 utterances)
    "iemocap4": {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"},
}


def read_vad(cell: str) -> dict[str, float] | None:
    """{"valence", "arousal", "dominance"} from "[2.5000, 3.0000, 2.5000]", None if malformed."""
    cell = cell.strip()
    if not (cell.startswith("[") and cell.endswith("]")):
        return None
    values = [as_number(v) for v in cell[1:-1].split(",")]
    if len(values) != 3 or any(v is None or not math.isfinite(v) for v in values):
        return None
    return dict(zip(DIMENSIONS, values))


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


def prepare_iemocap(corpus_dir: Path) -> list[Utterance]:
    """IEMOCAP: id = utterance id, speaker "Ses01_F", group "Session1", every label as the
    EmoEvaluation files write it; targets valence, arousal, dominance (1-5)."""
    corpus_dir = corpus_folder(corpus_dir, "iemocap", LAYOUT)
    wavs = [p for p in find_audio(corpus_dir, "iemocap", LAYOUT)
            if p.relative_to(corpus_dir).parts[1:3] == ("sentences", "wav")]
    if not wavs:
        raise RecordsError(f"no audio files under {corpus_dir}/Session*/sentences/wav: the "
                           f"iemocap recipe expects {LAYOUT}")
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
            speaker=IEMOCAP_SPEAKER.speaker(m), group=f"Session{int(m[1])}",
            duration=audio_duration(path), original_label=label, targets=vad,
        ))
    return records


RECIPE = Recipe("iemocap", prepare_iemocap, default_label_map="iemocap4", label_maps=IEMOCAP_MAPS)
