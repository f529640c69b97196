"""EmoDB, the Berlin Database of Emotional Speech (German): 10 speakers, 535 files, 7 emotions
(Burkhardt et al. 2005).

Where to get it: the publisher's site, emodb.bilderbar.info, over plain http only (the
per-file checksums are the integrity check; `ser-cache download emodb --to DIR` fetches,
unpacks and verifies it). The release unpacks to wav/, lablaut/, ...; its checksum list is by
file name inside wav/.

Layout (CORPUS_DIR is the folder you pass; .wav or .flac at any depth):

    CORPUS_DIR/wav/03a01Fa.wav

The name is speaker (2 digits), text (3 characters), emotion letter (German initial: W Wut,
L Langeweile, E Ekel, A Angst, F Freude, T Trauer, N neutral), version letter. Speaker "03",
no groups, id = file stem.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..records import Utterance
from .base import Recipe, Release, SpeakerRule, records_from_names

LAYOUT = "wav/03a01Fa.wav (speaker, text, emotion letter, version)"
EMODB_NAME = re.compile(r"(\d\d)([a-z]\d\d)([WLEAFTN])([a-z])")  # 03a01Fa: speaker, text, emotion, version
EMODB_SPEAKER = SpeakerRule(EMODB_NAME, lambda m: m[1], "03a01Fa -> 03")

EMODB_EMOTIONS = {  # German initials: Wut, Langeweile, Ekel, Angst, Freude, Trauer, neutral
    "W": "angry", "L": "bored", "E": "disgust", "A": "fearful",
    "F": "happy", "T": "sad", "N": "neutral",
}

RELEASE = Release((("download.zip", "http://emodb.bilderbar.info/download/download.zip"),),
                  "emodb.sha256", "wav")


def prepare_emodb(corpus_dir: Path) -> list[Utterance]:
    """EmoDB: id = file stem ("03a01Fa"), speaker = its first two digits ("03"), 7 classes."""
    return records_from_names(
        corpus_dir, "emodb", LAYOUT,
        "03a01Fa (speaker 2 digits, text 3 characters, emotion letter "
        f"{'/'.join(EMODB_EMOTIONS)}, version letter)",
        EMODB_SPEAKER, lambda m: EMODB_EMOTIONS[m[3]],
    )


RECIPE = Recipe("emodb", prepare_emodb, release=RELEASE)
