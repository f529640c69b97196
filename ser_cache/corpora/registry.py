"""The corpora `prepare` reads, by name, and the tables gathered from their recipes.

CORPORA      name -> Recipe, in the order the command line lists them
LABEL_MAPS   every named label map (original label -> class), whichever recipe brings it
RELEASES     name -> Release of every public corpus that can be downloaded or checked
"""
from __future__ import annotations

from . import emodb, iemocap, listed, msp_podcast, ravdess, shemo
from .base import Recipe, Release
from .other_releases import OTHER_RELEASES

CORPORA: dict[str, Recipe] = {r.name: r for r in (
    ravdess.RECIPE, shemo.RECIPE, iemocap.RECIPE, emodb.RECIPE, msp_podcast.RECIPE,
    listed.CSV_RECIPE, listed.EMOBOX_RECIPE, listed.HF_RECIPE,
)}


def gather_label_maps(recipes) -> dict[str, dict[str, str]]:
    """{map name: table} of every recipe's label maps; a name may be given by one recipe only."""
    maps: dict[str, dict[str, str]] = {}
    for r in recipes:
        for name, table in r.label_maps.items():
            assert name not in maps, f"label map {name!r} is given by two recipes (the second: {r.name})"
            maps[name] = dict(table)
    return maps


LABEL_MAPS = gather_label_maps(CORPORA.values())
RELEASES: dict[str, Release] = {
    **{name: r.release for name, r in CORPORA.items() if r.release is not None},
    **OTHER_RELEASES,
}
