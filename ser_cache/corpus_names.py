"""What the public corpora's file names say of their utterances (speaker, emotion, ...): the
patterns that their recipes (corpora.py) and EmoBox's metadata of them (emobox.py) both read.
"""
from __future__ import annotations

import re

# RAVDESS: Actor_XX/03-01-EE-II-SS-RR-AA.wav: modality, channel, emotion, intensity, statement,
# repetition, actor
RAVDESS_NAME = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)")
# ShEMO: F21N37.wav: gender, speaker, emotion letter, number
SHEMO_NAME = re.compile(r"([FM])(\d+)([AHNSWF])(\d+)")
# EmoDB: 03a01Fa.wav: speaker, text, emotion letter, version
EMODB_NAME = re.compile(r"(\d\d)([a-z]\d\d)([WLEAFTN])([a-z])")
# IEMOCAP: the session, the speaking actor's gender
IEMOCAP_ID = re.compile(r"Ses(\d\d)[FM]_.+_([FM])\d+")  # Ses01F_impro01_F000
