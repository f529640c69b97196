"""Label maps: a corpus's original labels -> the classes a cache is made of.

A label map (`LABEL_MAPS`, gathered from the recipes) maps original labels to classes.
Utterances whose original label the map does not list are dropped, counted per original
label, and the counts are reported in the summary (never silently). `label_map=None` means the
corpus's default (its recipe's `default_label_map`: iemocap4 for IEMOCAP, msp-podcast4 for
MSP-Podcast, no map for the others); "none" (NO_MAP) keeps every label.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Iterable

from ..records import RecordsError, Utterance
from .registry import CORPORA, LABEL_MAPS

NO_MAP = "none"  # the label-map name that keeps every label as it is


def resolve_label_map(
    corpus: str, label_map: str | None
) -> tuple[str | None, dict[str, str] | None]:
    """(name, table) of the map to apply; (None, None) keeps every label.

    None picks the corpus's default (its recipe's default_label_map); "none" keeps every label.
    """
    name = CORPORA[corpus].default_label_map if label_map is None else label_map
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
