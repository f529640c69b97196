"""Which encoder states a head reads: one state, or several stacked in every frame.

A *selection* is what stage 2 trains on, in one of two forms:

    4            one state (an int), as every run and sweep cell before multi-layer heads
    (2, 3, 4)    several states (a sorted tuple of two or more): their frames are stacked side
                 by side in each row, state after state (features.LayerData), and a head
                 mixes them (heads.StateMix) or, the linear probe, reads them all

Records keep a single state as the plain int it always was, and several as a JSON list, so
single-layer files read and write exactly as before (`to_json`, `as_selection`).

Written on the command line (`parse_selection` for `train --layer`, `parse_cells` for `sweep
--layers`):

    train --layer   one selection: 4, all, 2-5, 2,4,6, 2+4+6 or [2-5]   (several = one head
                    that mixes them)
    sweep --layers  cells separated by commas; each item is 4 (one cell), all (every state,
                    each its own cell), 2-5 (states 2 to 5, each its own cell), or one
                    multi-layer cell written with + or brackets: 2+3+4, 0-3+6, [2-5], [all]

so `--layers all` and `--layers 2-5` keep meaning single-layer cells, as they always did, and
`--layers all,2+3+4+5` puts four-state mixing beside every single state in one table. A cell
is labelled as it is typed back: `4`, or `2+3+4+5` (`label`).
"""
from __future__ import annotations

from typing import Iterable, Union

from .errors import OptionError

Selection = Union[int, tuple[int, ...]]

STATES_HELP = "use 'all', a number, a list '0,3,6' or a range '2-5'"
SELECTION_HELP = ("write one state (4), or several for one multi-layer head: all, a range 2-5, "
                  "a list 2,4,6 or 2+4+6, or [2-5]")
CELLS_HELP = ("write cells separated by commas: a state (4), every state as its own cell (all), a "
              "range of single-state cells (2-5), or one multi-layer cell as 2+3+4, 0-3+6 or [2-5] "
              "(quote brackets in a shell)")


def parse_states(spec: str, n_states: int, option: str = "--layers") -> list[int]:
    """'all', '6', '0,3,6', '2-5' (or '2+4', '[2-5]') -> sorted distinct state indices, each in
    0..n_states-1: a set of states, as `extract --layers` keeps them."""
    states = _expand(spec, n_states, option, STATES_HELP)
    bad = [s for s in states if s >= n_states]
    if bad:
        raise OptionError(f"{option} {spec!r}: this model has states 0..{n_states - 1} "
                          f"(0 = input embedding, {n_states - 1} = last)")
    return states


def parse_selection(spec: str, n_states: int, option: str = "--layer") -> Selection:
    """One selection (see the module docstring): '4' -> 4; 'all', '2-5', '2,4,6', '2+4+6',
    '[2-5]' -> a tuple of the states when there are several. States are not checked against
    a cache here (the caller names the cached ones)."""
    return selection(_expand(spec, n_states, option, SELECTION_HELP))


def parse_cells(spec: str, n_states: int, option: str = "--layers") -> list[Selection]:
    """Sweep cells (see the module docstring), single states first, then multi-layer cells,
    each in `sort_key` order, without repeats."""
    cells: set = set()
    for item in _split_top_level(spec, option):
        multi = item.startswith("[") or "+" in item
        if multi:
            cells.add(selection(_expand(item, n_states, option, CELLS_HELP)))
        else:
            cells.update(_expand(item, n_states, option, CELLS_HELP))
    return sorted(cells, key=sort_key)


def _split_top_level(spec: str, option: str) -> list[str]:
    """Split on the commas outside brackets: 'all,[2,4],3' -> ['all', '[2,4]', '3']."""
    items, depth, current = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise OptionError(f"{option} {spec!r}: brackets do not nest; {CELLS_HELP}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise OptionError(f"{option} {spec!r}: a ']' without its '['; {CELLS_HELP}")
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise OptionError(f"{option} {spec!r}: close the bracket, e.g. [2-5]; {CELLS_HELP}")
    items.append(current.strip())
    if not all(items):
        raise OptionError(f"{option} {spec!r}: an empty item; {CELLS_HELP}")
    return items


def _expand(spec: str, n_states: int, option: str, fix: str) -> list[int]:
    """The states of one selection, sorted and distinct (no range check against n_states
    beyond expanding 'all')."""
    text = str(spec).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    if "[" in text or "]" in text:
        raise OptionError(f"{option} {spec!r}: brackets go around a whole selection, e.g. [2-5]; {fix}")
    if text.lower() == "all":
        return list(range(n_states))
    states: set[int] = set()
    for term in text.replace("+", ",").split(","):
        term = term.strip()
        lo, dash, hi = term.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            why = f"{term!r} is not a state or range"
            if "all" in term.lower():
                why = "'all' stands alone, e.g. [all]"
            raise OptionError(f"{option} {spec!r}: {why}; {fix}") from None
        if first < 0 or last < first:
            raise OptionError(f"{option} {spec!r}: {term!r} is not a range of states 0, 1, ...: "
                              f"write the lower state first, e.g. {min(first, last)}-{max(first, last)}")
        states.update(range(first, last + 1))
    return sorted(states)


def selection(states: Iterable[int]) -> Selection:
    """Normal form: one state -> that int; several -> their sorted distinct tuple."""
    states = sorted({int(s) for s in states})
    assert states, "a selection of no states"
    return states[0] if len(states) == 1 else tuple(states)


def as_selection(value) -> Selection:
    """A selection from a record's value (an int, or a JSON list of states)."""
    return int(value) if isinstance(value, int) else selection(value)


def states_of(value) -> list[int]:
    """The states of a selection (or of a record's value), sorted."""
    sel = as_selection(value)
    return [sel] if isinstance(sel, int) else list(sel)


def to_json(value) -> int | list[int]:
    """What records store: the int for one state (as before), a list for several."""
    sel = as_selection(value)
    return sel if isinstance(sel, int) else list(sel)


def is_multi(value) -> bool:
    return not isinstance(as_selection(value), int)


def label(value) -> str:
    """'4', or '2+3+4+5': a selection as the command line takes it back."""
    return "+".join(str(s) for s in states_of(value))


def dir_name(value) -> str:
    """A sweep cell's folder: 'layer_04' (as before), or 'layers_02+03+04' for several."""
    states = states_of(value)
    if len(states) == 1:
        return f"layer_{states[0]:02d}"
    return "layers_" + "+".join(f"{s:02d}" for s in states)


def sort_key(value) -> tuple:
    """Single states first, by state; then multi-layer selections, by their states."""
    states = states_of(value)
    return (len(states) > 1, tuple(states))
