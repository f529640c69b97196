"""RAVDESS speech: 24 actors, 8 emotions, 1440 files (Livingstone & Russo 2018, CC BY-NC-SA 4.0).

Where to get it: Zenodo record 1188976, `Audio_Speech_Actors_01-24.zip`
(`ser-cache download ravdess --to DIR` fetches, unpacks and verifies it).

Layout (CORPUS_DIR is the folder you pass; .wav or .flac at any depth):

    CORPUS_DIR/Actor_01/03-01-05-01-02-01-01.wav

The name is modality-channel-emotion-intensity-statement-repetition-actor. Modality must be 03
(audio only) and vocal channel 01 (speech): song files (channel 02, from
`Audio_Song_Actors_01-24.zip`) are refused rather than mixed in. Speaker "Actor_01", no
groups, id = file stem.

Label maps keyed by the decoded names: `ravdess-arousal` (high/low) and `ravdess-valence`
(positive/negative, neutral dropped), and `ravdess-emodb6` for cross-corpus work, the six
classes RAVDESS and EmoDB share.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..audio import audio_duration
from ..records import RecordsError, Utterance, listing
from .base import Recipe, Release, SpeakerRule, corpus_folder, find_audio, refuse_unmatched

LAYOUT = "Actor_XX/03-01-EE-II-SS-RR-AA.wav (or .flac), from Audio_Speech_Actors_01-24.zip"
# Actor_XX/03-01-EE-II-SS-RR-AA.wav: modality, channel, emotion, intensity, statement,
# repetition, actor
RAVDESS_NAME = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)")
RAVDESS_SPEAKER = SpeakerRule(RAVDESS_NAME, lambda m: f"Actor_{m[7]}", "03-01-EE-II-SS-RR-AA -> Actor_AA")
SPEECH, SONG = "01", "02"  # the vocal channel field
AUDIO_ONLY = "03"  # the modality field

RAVDESS_EMOTIONS = {
    "01": "neutral", "02": "calm", "03": "happy", "04": "sad",
    "05": "angry", "06": "fearful", "07": "disgust", "08": "surprised",
}

RAVDESS_MAPS = {
    # the 8 emotions as binary arousal and valence; neutral has no valence side: dropped
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
}

ZENODO = "https://zenodo.org/records/1188976/files/Audio_Speech_Actors_01-24.zip?download=1"
RELEASE = Release((("Audio_Speech_Actors_01-24.zip", ZENODO),), "ravdess.sha256")


def prepare_ravdess(corpus_dir: Path) -> list[Utterance]:
    """RAVDESS speech: id = file stem, speaker "Actor_AA", 8 classes, no groups."""
    corpus_dir = corpus_folder(corpus_dir, "ravdess", LAYOUT)
    records, bad, songs = [], [], []
    for path in find_audio(corpus_dir, "ravdess", LAYOUT):
        m = RAVDESS_NAME.fullmatch(path.stem)
        if not m or m[1] != AUDIO_ONLY or m[2] not in (SPEECH, SONG) or m[3] not in RAVDESS_EMOTIONS:
            bad.append(path)
            continue
        if m[2] == SONG:
            songs.append(path)
            continue
        label = RAVDESS_EMOTIONS[m[3]]
        records.append(Utterance(
            id=path.stem, path=str(path), label=label, speaker=RAVDESS_SPEAKER.speaker(m),
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
    return records


RECIPE = Recipe("ravdess", prepare_ravdess, release=RELEASE, label_maps=RAVDESS_MAPS)
