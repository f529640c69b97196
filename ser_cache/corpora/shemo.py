"""ShEMO, the Sharif Emotional Speech Database (Persian): 87 speakers, 3000 files, 6 emotions
(Mohamad Nezami et al. 2019).

Where to get it: female.zip and male.zip of github.com/mansourehk/ShEMO, released there by its
authors (`ser-cache download shemo --to DIR` fetches and unpacks them). No per-file checksum
list is published, so its files are unpacked but not verified. Others have reported these
archives as broken (a Git LFS pointer instead of a zip, for instance); the error then says so.

Layout (CORPUS_DIR is the folder you pass; .wav or .flac at any depth):

    CORPUS_DIR/female/F21N37.wav, CORPUS_DIR/male/M13A05.wav

The name is gender F/M, speaker number, emotion letter, utterance number. Speaker "F21", no
groups, id = file stem. The label map `shemo4` keeps angry, happy, neutral and sad.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..records import Utterance
from .base import Recipe, Release, SpeakerRule, records_from_names

LAYOUT = "female/F21N37.wav and male/M13A05.wav (gender, speaker, emotion letter, number)"
SHEMO_NAME = re.compile(r"([FM])(\d+)([AHNSWF])(\d+)")  # F21N37: gender, speaker, emotion letter, number
SHEMO_SPEAKER = SpeakerRule(SHEMO_NAME, lambda m: m[1] + m[2], "F21N37 -> F21")

SHEMO_EMOTIONS = {
    "A": "angry", "H": "happy", "N": "neutral", "S": "sad", "W": "surprised", "F": "fearful",
}

SHEMO_MAPS = {
    # the 4-class ShEMO benchmark; keys are decoded names, so it fits RAVDESS and EmoDB too
    "shemo4": {"angry": "angry", "happy": "happy", "neutral": "neutral", "sad": "sad"},
}

GITHUB = "https://github.com/mansourehk/ShEMO/raw/master"
RELEASE = Release(
    (("female.zip", f"{GITHUB}/female.zip"), ("male.zip", f"{GITHUB}/male.zip")),
    None,  # no published per-file list exists for ShEMO
)


def prepare_shemo(corpus_dir: Path) -> list[Utterance]:
    """ShEMO: id = file stem ("F21N37"), speaker = gender + number ("F21"), 6 classes."""
    return records_from_names(
        corpus_dir, "shemo", LAYOUT,
        "F21N37 (gender F/M, speaker number, emotion letter "
        f"{'/'.join(SHEMO_EMOTIONS)}, utterance number)",
        SHEMO_SPEAKER, lambda m: SHEMO_EMOTIONS[m[3]],
    )


RECIPE = Recipe("shemo", prepare_shemo, release=RELEASE, label_maps=SHEMO_MAPS)
