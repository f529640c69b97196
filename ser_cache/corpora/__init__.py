"""Corpus recipes: a raw corpus folder -> a list of `Utterance` records (records.py).

One module per corpus, each holding the corpus's folder layout (its docstring), its file-name
pattern, its emotion table, its label maps, its `prepare_<name>(corpus_dir)` and the
description of its public release (`Release`: archives, URLs, checksum list):

    ravdess.py      RAVDESS speech (downloadable, checked)
    shemo.py        ShEMO (downloadable)
    emodb.py        EmoDB (downloadable, checked)
    iemocap.py      IEMOCAP (licensed; used as it unpacks)
    msp_podcast.py  MSP-Podcast (licensed; used as it unpacks)
    listed.py       corpora listed in a file: csv (a manifest you write), emobox (EmoBox's
                    metadata), hf (a Hugging Face audio dataset)

and the machinery they share:

    base.py            Recipe, Release, SpeakerRule; finding the corpus folder and its audio
    registry.py        CORPORA (name -> Recipe), LABEL_MAPS and RELEASES gathered from the recipes
    other_releases.py  public corpora checked against their SHA-256 lists without a recipe
    labels.py          label maps: resolving a name, applying it, counting the drops
    preparing.py       `prepare` for the command line: recipe, label map, validation, summary,
                       provenance (`corpus_source`)

download.py downloads and verifies the releases the recipes describe.

Class names
    Each corpus's own codes are decoded by a named table (`RAVDESS_EMOTIONS`, ...) into one
    set of English names, so that a class means the same thing in every corpus: neutral, calm,
    happy, sad, angry, fearful, disgust, surprised, bored. `Utterance.original_label` keeps the
    label before any label map: that decoded name for corpora whose labels are file-name codes,
    the corpus's own word for IEMOCAP ("neu", "exc", ...), the cell as written for a CSV.

Label maps
    A recipe's `prepare` returns every utterance with its original label; `prepare` here then
    applies the label map (labels.py): utterances whose original label the map does not list
    are dropped, counted per original label, and reported in the summary. Maps keyed by
    decoded names fit every corpus that uses them (`shemo4` fits RAVDESS and EmoDB too;
    `ravdess-emodb6` is the six classes RAVDESS and EmoDB share, for cross-corpus work).

Folder layouts: CORPUS_DIR is the folder you pass; audio may be .wav or .flac at any depth
unless a recipe says otherwise; names starting with "." such as macOS "._" resource forks are
not audio and are ignored.
"""
from __future__ import annotations

from .base import Recipe, Release
from .labels import NO_MAP, resolve_label_map
from .preparing import (PreparedCorpus, corpus_source, prepare, single_speaker_labels, single_speaker_warnings,
                        source_text)
from .ravdess import RAVDESS_EMOTIONS
from .registry import CORPORA, LABEL_MAPS, RELEASES

__all__ = [
    "CORPORA", "LABEL_MAPS", "NO_MAP", "RAVDESS_EMOTIONS", "RELEASES", "PreparedCorpus", "Recipe",
    "Release", "corpus_source", "prepare", "resolve_label_map", "single_speaker_labels", "single_speaker_warnings",
    "source_text",
]
