"""Tables and plots of layer-wise sweeps, rebuilt at any time from what a sweep saved.

    SWEEP/cells/**/*.json  (one per finished fold of a cell)  --write_report-->
        results.csv         one row per cell and fold
        summary.md          UA mean ± std per layer and head, best cells marked, time spent
        ua_by_layer.png     UA against layer, one line per head, a band for the std over folds
                            (cross-corpus: a dashed line per head for the test cache);
                            one panel per cache (per sweep and cache when sweeps are compared);
                            a multi-layer cell is a dotted level across the panel
        confusion_best.png  the best cell's confusion matrix per panel, normalised by row
        layer_weights.png   (sweeps with multi-layer cells) the learned softmax weight of each
                            state, mean ± std over folds and seeds, per multi-layer cell and head
        ua_by_depth.png     (caches of different encoders) UA against relative depth, state / last
                            state of its encoder, one line per cache and head on one axis, a band
                            for the std over folds: a 13-state and a 25-state model line up

Comparing models. When the caches of a sweep, or of sweeps reported side by side, come from
different encoders (by fingerprint), summary.md opens with a table of every cache, layer and
head with the model (its name and family, as the cache records them) and the relative depth
as columns, after a line per cache naming its best cells, and ua_by_depth.png is drawn.
Multi-layer cells have no depth: they stay in the tables and are left out of that plot. With
one model the report is as it was.

A cross-corpus sweep (`--test-cache`, crosscorpus.py) adds each cell's UA on the test corpus
beside its in-corpus UA: a second table in summary.md, test_corpus_* columns in results.csv
(TEST_CORPUS_COLUMNS).

Rows of the table are layers: single states first, then multi-layer cells labelled as they are
typed (`2+3+4`), so a multi-layer head is read against every single state and the linear
probe on the same states.

A regression sweep (`--task regression`, CellFoldRecord.task) has no UA, confusion or chance
line; instead

        results.csv         CCC (mean over targets), validation CCC, and CCC, Pearson r, MAE per target
        summary.md          a CCC table per target (layer x head), the best cells marked
        ccc_by_layer.png    test CCC against layer, one curve per target (colour) and head (line
                            style), a band for the std over folds: the arousal-vs-valence profile

and the best cells are chosen by the mean CCC over targets (test ★, validation †). Regression
and classification sweeps are not reported together.

Two cells are marked in each panel. The best mean test UA (★) describes where emotion is
most linearly/attentively readable; as a choice it would be optimistic, since the test folds
pick it. The best mean validation UA (†) is the cell an honest selection would take.
Means and stds pool every fold of every seed (population std, like metrics.py).

A sweep run with `--compat-speaker-overlap` (folds that test speakers they also train on) is
FLAWED: its summary opens with that warning, every panel title (so every plot) says
"FLAWED (speaker-dependent)", its folds are called speaker-dependent, results.csv gets a
`flawed` column, and it is never joined with an honest sweep in one report.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import FIXED_EQUAL, weighting
from .layers import Selection, as_selection, is_multi, label, sort_key, states_of
from .results import CellFoldRecord, SweepError, SweepFolder, SweepTiming

RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.md"
LAYER_PLOT = "ua_by_layer.png"
CONFUSION_PLOT = "confusion_best.png"
WEIGHTS_PLOT = "layer_weights.png"
CCC_PLOT = "ccc_by_layer.png"
DEPTH_PLOT = "ua_by_depth.png"
WHISPER_FAMILIES = (None, "openai-whisper", "whisper")  # None: cells saved before families were recorded
REGRESSION_COLUMNS = ("cache", "model", "mode", "layer", "head", "setting", "seed", "fold", "ccc", "val_ccc",
                      "seconds", "epoch", "n_test", "layer_weights")
RESULT_COLUMNS = ("cache", "model", "mode", "layer", "head", "setting", "seed", "fold", "ua", "wa",
                  "macro_f1", "seconds", "val_ua", "weighted_f1", "epoch", "n_test", "layer_weights")
TEST_CORPUS_COLUMNS = ("test_corpus_ua", "test_corpus_wa", "test_corpus_macro_f1", "n_test_corpus")  # cross-corpus only
PER_TARGET = ("ccc", "pearson", "mae")  # a regression cell's scores of each target
PANEL_COLUMNS = 3  # panels per row of a figure
FLAWED_LABEL = "FLAWED (speaker-dependent)"


@dataclass
class Sweep:
    """A sweep folder as saved: its config, its finished cell folds' records, its run timings."""

    folder: SweepFolder
    config: dict
    records: list[CellFoldRecord]
    timing: list[SweepTiming]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def regression(self) -> bool:
        return self.config["train"].get("task", "classification") == "regression"

    @property
    def flawed(self) -> bool:
        """Run with --compat-speaker-overlap: its folds test speakers they train on."""
        return bool(self.config["train"].get("compat_speaker_overlap"))


@dataclass
class Cell:
    """One (layer, head) of a panel, pooled over folds and seeds. Metrics in [0, 1].

    In a regression sweep, ua and val_ua hold the headline score instead, the CCC averaged
    over targets (test (mean, std), validation mean), so that the best cells are found alike;
    wa, macro_f1 are NaN, and `targets` holds {target: {"ccc"|"pearson"|"mae": (mean, std)}}.
    """

    layer: Selection  # a state, or a tuple of states (a multi-layer cell)
    head: str
    ua: tuple[float, float]  # (mean, std)
    wa: tuple[float, float]
    macro_f1: tuple[float, float]
    val_ua: float
    n: int  # fold x seed results pooled
    settings: Counter
    seconds: float
    confusion: np.ndarray  # (classes, classes) counts summed over folds and seeds
    layer_weights: tuple[np.ndarray, np.ndarray] | None = None  # (mean, std) per state, multi-layer cells
    # with layer_weights: how far they are from equal, fold by fold (uniformity), as
    # {"max_dev": mean over folds, "entropy": mean over folds, "uniform": every fold's, "verdict": words}
    mix: dict | None = None
    test_corpus_ua: tuple[float, float] | None = None  # cross-corpus: (mean, std) UA on the test cache
    targets: dict | None = None  # regression only


@dataclass
class Panel:
    """One cache of one sweep: its cells, and what describes it."""

    title: str
    sweep: Sweep
    cache: str
    heads: list[str]
    labels: list[str]
    cells: dict[tuple[int, str], Cell]
    folds: dict  # protocol, n_folds, seeds, n_utterances
    name: str = ""  # the cache's key, after the sweep's name when sweeps are compared
    model: str = ""  # the encoder's name, as its cache records it
    family: str | None = None  # its family (None: cells saved before cells recorded it)
    last_state: int = 1  # the encoder's output state (its blocks): depth = state / last_state

    @property
    def encoder(self) -> str:
        """'wavlm-large (wavlm)': the encoder's name and family."""
        return f"{self.model} ({self.family})" if self.family else self.model

    @property
    def model_sha256(self) -> str | None:
        """The encoder's fingerprint, from the sweep's record of the cache."""
        return self.sweep.config["caches"].get(self.cache, {}).get("model_sha256")

    @property
    def layers(self) -> list[Selection]:
        """Single states in order, then multi-layer cells."""
        return sorted({layer for layer, _ in self.cells}, key=sort_key)

    def ordered(self) -> list[Cell]:
        """Cells by layer (layers' order), then head (the sweep's order)."""
        return [self.cells[layer, head] for layer in self.layers for head in self.heads
                if (layer, head) in self.cells]

    @property
    def best(self) -> Cell:  # ties: the first in order, so the lower layer
        return max(self.ordered(), key=lambda c: c.ua[0])

    @property
    def best_val(self) -> Cell:
        return max(self.ordered(), key=lambda c: c.val_ua)


# --- loading ----------------------------------------------------------------------------------


def load_sweep(path: Path) -> Sweep:
    """Read a sweep folder. Raises SweepError if it is not one."""
    folder = SweepFolder(path)
    config = folder.read_config()
    head_order = {h: i for i, h in enumerate(config["heads"])}
    cache_order = {c: i for i, c in enumerate(config["caches"])}
    records = sorted(folder.cells(), key=lambda r: (cache_order.get(r.cache, len(cache_order)), sort_key(r.layer),
                                                    head_order.get(r.head, len(head_order)), r.seed, r.fold))
    return Sweep(folder, config, records, folder.timing())


def progress(sweep: Sweep) -> dict:
    """How far a sweep is, for one still running (SLURM array tasks, several processes):
    {"cells": (complete, planned), "folds": (done, planned), "running": folds whose claim a
    live process holds now}. A cell is one (cache, layer, head, seed), complete when every fold
    is done; a cache and seed whose folds are not saved yet count as 0 of unknown: planned None."""
    from .locks import lock_held

    config, done = sweep.config, Counter((r.cache, as_selection(r.layer), r.head, r.seed) for r in sweep.records)
    cells = folds = 0
    complete = 0
    for cache, layers in config["layers"].items():
        for seed in config["seeds"]:
            n_folds = sweep.folder.fold_meta(cache, seed).get("n_folds")
            if n_folds is None:
                return {"cells": (0, None), "folds": (len(sweep.records), None), "running": 0}
            for layer in layers:
                for head in config["heads"]:
                    cells += 1
                    folds += n_folds
                    complete += done[cache, as_selection(layer), head, seed] == n_folds
    running = sum(lock_held(p) for p in (sweep.folder.root / SweepFolder.CELLS).glob("*/*/*.lock"))
    return {"cells": (complete, cells), "folds": (len(sweep.records), folds), "running": running}


def finished(p: dict) -> bool:
    return p["cells"][1] is not None and p["cells"][0] == p["cells"][1] and p["folds"][0] == p["folds"][1]


def progress_text(sweep: Sweep) -> str:
    """'sweep NAME: 3 of 8 cells complete (20 of 48 folds, 2 running now)', or '... complete'."""
    p = progress(sweep)
    (c, n_cells), (f, n_folds) = p["cells"], p["folds"]
    if finished(p):
        return f"sweep {sweep.name}: complete ({n_cells} cells, {n_folds} folds)"
    running = f", {p['running']} claimed by running jobs" if p["running"] else ""
    return f"sweep {sweep.name}: {c} of {n_cells or '?'} cells complete ({f} of {n_folds or '?'} folds{running})"


def panels_of(sweeps: list[Sweep]) -> list[Panel]:
    """One panel per cache of each sweep, in order; titles name the sweep when several."""
    panels = []
    for sweep in sweeps:
        for cache in sweep.config["caches"]:
            records = [r for r in sweep.records if r.cache == cache]
            if not records:
                continue
            first = records[0]
            title = f"{cache} ({first.model}, {first.mode})"
            if len(sweeps) > 1:
                title = f"{sweep.name}: {title}"
            if sweep.flawed:
                title = f"{title} {FLAWED_LABEL}"
            name = f"{sweep.name}: {cache}" if len(sweeps) > 1 else cache
            family = next((r.family for r in records if r.family), None)
            last = next((r.last_state for r in records if r.last_state is not None), None)
            if last is None:  # cells saved before they recorded it: the highest state swept
                last = max(s for layer in sweep.config["layers"].get(cache, [r.layer for r in records])
                           for s in states_of(layer))
            panels.append(Panel(title, sweep, cache, list(sweep.config["heads"]), first.labels,
                                _cells(records, sweep.config["train"]),
                                _fold_info(sweep, cache, records), name, first.model, family,
                                max(1, int(last))))
    return panels


def several_models(panels: list[Panel]) -> bool:
    """Whether the panels' caches come from more than one encoder (told apart by fingerprint)."""
    return len({p.model_sha256 or p.encoder for p in panels}) > 1


def relative_depth(state: int, last_state: int) -> float:
    """Where a state lies in its encoder: 0 the input to the first block, 1 the encoder's
    output, so that state 6 of 12 blocks and state 12 of 24 both lie at 0.5."""
    assert 0 <= state <= last_state, f"state {state} outside the encoder's states 0..{last_state}"
    return state / last_state


def depth_curve(p: Panel, head: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth, UA mean, UA std), each (n,), of the head's single-state cells in the panel, in
    state order; depth = state / p.last_state. Multi-layer cells have no depth: left out."""
    cells = [p.cells[layer, head] for layer in p.layers if not is_multi(layer) and (layer, head) in p.cells]
    depth = np.array([relative_depth(c.layer, p.last_state) for c in cells], dtype=np.float64)
    return depth, np.array([c.ua[0] for c in cells]), np.array([c.ua[1] for c in cells])


UNIFORM_TOLERANCE = 0.1  # a mix "stayed uniform" when every weight is within 10% of 1 / n_states


def uniformity(weights) -> dict:
    """How far a mix's weights (n_states,) are from equal: "max_dev", the largest |w_s - 1/L|;
    "entropy", the weights' entropy / log L (1 for equal weights, 0 for one state alone); and
    "uniform", whether every weight is within UNIFORM_TOLERANCE / L of 1/L (then the mix
    says nothing about which states matter)."""
    w = np.asarray(weights, dtype=np.float64)
    assert w.ndim == 1 and len(w) > 1, f"weights of shape {w.shape}: one per state, several states"
    max_dev = float(np.abs(w - 1 / len(w)).max())
    entropy = float(-(w * np.log(np.clip(w, 1e-300, None))).sum() / math.log(len(w)))
    return {"max_dev": max_dev, "entropy": entropy, "uniform": max_dev * len(w) <= UNIFORM_TOLERANCE}


def mix_verdict(mixes: list[str], uniform: list[bool], n_states: int, key: str = "mix") -> str:
    """One plain sentence on a mix over n_states states, for tables, summaries and plots, from
    each fold's weighting ("learned" or "equal", config.weighting; key: the setting that fixes
    equal weights) and `uniformity(...)["uniform"]`: whether the weights learned anything, and,
    if not, that they show no layer importance."""
    learned = [u for m, u in zip(mixes, uniform) if m == "learned"]
    within = f"every weight within {UNIFORM_TOLERANCE:.0%} of 1/{n_states}"
    parts = []
    if len(learned) < len(mixes):
        parts.append(f"equal weights, fixed ({FIXED_EQUAL[key]})" + (f" in {len(mixes) - len(learned)} of {len(mixes)} folds"
                                                            if learned else ""))
    if learned and not all(learned):
        moved = len(learned) - sum(learned)
        return "; ".join(parts + [f"the learned mix left equal weights in {moved} of {len(learned)} folds "
                                  f"(not {within})"])
    if learned:
        parts.append(f"the learned mix stayed uniform ({within} in {'every fold' if len(learned) > 1 else 'its fold'})")
    return "; ".join(parts) + ": it shows no layer importance (the per-state curve, one state per cell, does)"


def mix_summary(records: list[CellFoldRecord], train: dict) -> dict | None:
    """How far the state weights of a cell's records (folds x seeds) are from equal (Cell.mix);
    train: the sweep's settings, unless a record's grid setting chose its own. None without weights."""
    rs = [r for r in records if r.layer_weights is not None]
    if not rs:
        return None
    u = [uniformity(r.layer_weights) for r in rs]
    modes = [weighting(r.head, {**train, **(r.values or {})}) for r in rs]
    return {"max_dev": float(np.mean([d["max_dev"] for d in u])), "entropy": float(np.mean([d["entropy"] for d in u])),
            "uniform": all(d["uniform"] for d in u),
            "verdict": mix_verdict([m for m, _ in modes], [d["uniform"] for d in u], len(rs[0].layer_weights),
                                   modes[0][1])}


def _cells(records: list[CellFoldRecord], train: dict | None = None) -> dict[tuple[Selection, str], Cell]:
    groups: dict[tuple[Selection, str], list[CellFoldRecord]] = {}
    for r in records:
        groups.setdefault((as_selection(r.layer), r.head), []).append(r)
    cells = {}
    for (layer, head), rs in groups.items():
        weights = [r.layer_weights for r in rs if r.layer_weights is not None]
        weights = (np.mean(weights, axis=0), np.std(weights, axis=0)) if weights else None
        common = dict(n=len(rs), settings=Counter(r.setting for r in rs), seconds=float(sum(r.seconds for r in rs)),
                      layer_weights=weights, mix=mix_summary(rs, train or {}))
        def test(name: str) -> tuple[float, float]:
            return _mean_std([r.metrics[name] for r in rs])

        if rs[0].task == "regression":
            nan = (float("nan"), float("nan"))
            cells[layer, head] = Cell(layer, head, test("ccc"), nan, nan, _mean_std([r.selected["ccc"] for r in rs])[0],
                                      confusion=np.zeros((0, 0)), targets=_target_stats(rs), **common)
        else:
            cells[layer, head] = Cell(layer, head, test("ua"), test("wa"), test("macro_f1"),
                                      _mean_std([r.selected["ua"] for r in rs])[0],
                                      confusion=np.sum([r.metrics["confusion"] for r in rs], axis=0),
                                      test_corpus_ua=_test_corpus_ua(rs), **common)
    return cells


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std())


def _test_corpus_ua(records: list[CellFoldRecord]) -> tuple[float, float] | None:
    """(mean, std) UA on the test cache over the records, None when they have none."""
    values = np.array([r.test_corpus["ua"] for r in records if r.test_corpus], dtype=np.float64)
    return (float(values.mean()), float(values.std())) if len(values) else None


def _target_stats(rs: list[CellFoldRecord]) -> dict:
    """{target: {"ccc"|"pearson"|"mae": (mean, std)}} of a regression cell over its records
    `rs`, an undefined value (None, e.g. r of constant predictions) left out as
    metrics.summarize_regression does."""
    out = {}
    for target in rs[0].labels:
        out[target] = {}
        for stat in PER_TARGET:
            v = np.array([m for r in rs if (m := r.metrics["targets"][target][stat]) is not None], dtype=np.float64)
            out[target][stat] = (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))
    return out


def _fold_info(sweep: Sweep, cache: str, records: list[CellFoldRecord]) -> dict:
    seeds = sweep.config["seeds"]
    meta = sweep.folder.fold_meta(cache, seeds[0])
    r = records[0]
    return {"protocol": meta.get("protocol", "?"), "n_folds": meta.get("n_folds", "?"),
            "seeds": seeds, "n_utterances": r.n_train + r.n_val + r.n_test}


# --- writing ----------------------------------------------------------------------------------


def write_report(sweeps: list[Path], out: Path) -> dict[str, Path]:
    """Write results.csv, summary.md and the plots of `sweeps` into `out`; returns their paths.
    Raises SweepError when a folder is not a sweep or nothing has finished yet."""
    loaded = [load_sweep(s) for s in sweeps]
    panels = panels_of(loaded)
    if not panels:
        raise SweepError(f"no finished cells in {', '.join(str(s) for s in sweeps)}: run or resume "
                         "the sweep first")
    flawed = [s.name for s in loaded if s.flawed]
    if flawed and len(flawed) < len(loaded):
        raise SweepError(f"{', '.join(flawed)}: {FLAWED_LABEL} (--compat-speaker-overlap), the others honest: "
                         "one report never mixes them; report them separately")
    kinds = {s.regression for s in loaded}
    if len(kinds) > 1:
        raise SweepError("regression and classification sweeps cannot share one table: report them separately")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / RESULTS_FILE, "summary": out / SUMMARY_FILE}
    write_results_csv(loaded, paths["results"])
    if kinds == {True}:
        paths["summary"].write_text(regression_markdown(loaded, panels), encoding="utf-8")
        paths["ccc"] = out / CCC_PLOT
        plot_ccc(panels, paths["ccc"])
        return paths | weights_plot(panels, out)
    paths["summary"].write_text(summary_markdown(loaded, panels), encoding="utf-8")
    paths |= {"layers": out / LAYER_PLOT, "confusion": out / CONFUSION_PLOT}
    plot_layers(panels, paths["layers"])
    plot_confusions(panels, paths["confusion"])
    if several_models(panels):
        paths["depth"] = out / DEPTH_PLOT
        plot_depth(panels, paths["depth"])
    return paths | weights_plot(panels, out)


def weights_plot(panels: list[Panel], out: Path) -> dict[str, Path]:
    """layer_weights.png when some cell learned a mix of states: {"weights": its path}, else {}."""
    if not any(c.layer_weights is not None for p in panels for c in p.cells.values()):
        return {}
    plot_layer_weights(panels, out / WEIGHTS_PLOT)
    return {"weights": out / WEIGHTS_PLOT}


def write_results_csv(sweeps: list[Sweep], path: Path) -> None:
    """One row per cell fold; a leading `sweep` column when several sweeps are joined. A
    classification sweep's columns are RESULT_COLUMNS (and TEST_CORPUS_COLUMNS when cross-corpus);
    a regression sweep's REGRESSION_COLUMNS, then CCC, Pearson r and MAE per target."""
    several = len(sweeps) > 1
    records = [r for s in sweeps for r in s.records]
    if sweeps[0].regression:
        targets = list(dict.fromkeys(t for r in records for t in r.labels))
        columns = REGRESSION_COLUMNS + tuple(f"{stat}_{t}" for t in targets for stat in PER_TARGET)
    else:
        columns = RESULT_COLUMNS + (TEST_CORPUS_COLUMNS if any(r.test_corpus for r in records) else ())
    columns += ("flawed",) if any(s.flawed for s in sweeps) else ()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow((["sweep"] if several else []) + list(columns))
        for sweep in sweeps:
            for r in sweep.records:
                row = _csv_row(r, sweep.flawed)
                w.writerow(([sweep.name] if several else []) + [_csv_value(row.get(c, "")) for c in columns])


def _csv_row(r: CellFoldRecord, flawed: bool) -> dict:
    """Every column results.csv may have, of one cell fold."""
    weights = " ".join(f"{w:.4f}" for w in r.layer_weights) if r.layer_weights is not None else ""
    row = {**r.to_dict(), **r.metrics, "val_ua": r.selected.get("ua"), "val_ccc": r.selected.get("ccc"),
           "layer": label(r.layer), "epoch": r.selected.get("epoch", ""), "layer_weights": weights,
           "n_test_corpus": r.test_corpus.get("n", ""), "flawed": FLAWED_LABEL if flawed else "",
           **{f"test_corpus_{k}": r.test_corpus.get(k, "") for k in ("ua", "wa", "macro_f1")}}
    row.update({f"{stat}_{t}": v for t, m in r.metrics.get("targets", {}).items() for stat, v in m.items()})
    return row


def _csv_value(v):
    return f"{v:.6f}" if isinstance(v, float) else v


def pct(pair) -> str:
    return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def summary_markdown(sweeps: list[Sweep], panels: list[Panel]) -> str:
    """The summary: a layer x head UA table per panel, the best cells, all cells, time spent."""
    names = ", ".join(s.name for s in sweeps)
    lines = [f"# Layer-wise sweep: {names}", "",
             "UA = unweighted accuracy (mean per-class recall), WA = accuracy, in %: mean ± std over "
             "every fold of every seed (population std). Epochs, the linear head's C and grid "
             "settings were chosen on validation speakers only; the test speakers scored the "
             "choice once.", "",
             "★ best mean test UA in the panel (descriptive: the test folds pick it). "
             "† best mean validation UA (the cell an honest selection would pick).", ""]
    lines[1:1] = flawed_warning(sweeps)
    unfinished = [progress_text(s) for s in sweeps if not finished(progress(s))]
    if unfinished:  # a sweep still running or interrupted: the table holds its finished folds only
        lines += ["**Partial:** " + "; ".join(unfinished) + ". The table pools the folds done so far.", ""]
    if several_models(panels):
        lines += _models_markdown(panels)
    for p in panels:
        lines += _panel_markdown(p)
    lines += _timing_markdown(sweeps)
    return "\n".join(lines).rstrip() + "\n"


def flawed_warning(sweeps: list[Sweep]) -> list[str]:
    """The lines that open the summary of a FLAWED sweep; none for an honest one."""
    if not any(s.flawed for s in sweeps):
        return []
    return ["", f"**{FLAWED_LABEL}:** run with --compat-speaker-overlap: its folds test speakers they also "
            "train on, so these scores measure recognising known speakers, not emotion in new ones. Only for "
            "comparison with results published on the same folds; never compare them with honest results."]


def folds_kind(p: Panel) -> str:
    return "speaker-dependent" if p.sweep.flawed else "speaker-independent"


def _panel_markdown(p: Panel) -> list[str]:
    f = p.folds
    n_classes = len(p.labels)
    lines = [f"## {p.title}", "",
             f"{f['n_utterances']} utterances, {n_classes} classes ({', '.join(p.labels)}; chance UA "
             f"{100 / n_classes:.1f}); {f['n_folds']} {folds_kind(p)} folds ({f['protocol']}) "
             f"x seeds {f['seeds']}. {_training_line(p.sweep.config, _arithmetic(p))}", "",
             "UA % by layer (rows) and head (columns):", "",
             "| layer | " + " | ".join(p.heads) + " |",
             "|---:|" + "---:|" * len(p.heads)]
    best, best_val = p.best, p.best_val
    for layer in p.layers:
        row = []
        for head in p.heads:
            c = p.cells.get((layer, head))
            if c is None:
                row.append("–")
                continue
            text = pct(c.ua)
            if c is best:
                text = f"**{text}** ★"
            if c is best_val:
                text += " †"
            row.append(text)
        lines.append(f"| {label(layer)} | " + " | ".join(row) + " |")
    lines += ["", f"Best cell ★: layer {label(best.layer)}, {best.head}: UA {pct(best.ua)}, WA {pct(best.wa)}, "
              f"macro-F1 {pct(best.macro_f1)} ({best.n} fold results).",
              f"Best on validation †: layer {label(best_val.layer)}, {best_val.head}: validation UA "
              f"{100 * best_val.val_ua:.1f}, test UA {pct(best_val.ua)}.", ""]
    lines += _weights_markdown(p)
    lines += _test_corpus_markdown(p)
    lines += ["<details><summary>All cells</summary>", "",
              "| layer | head | UA | WA | macro-F1 | val UA | folds x seeds | chosen on validation | seconds |",
              "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for layer in p.layers:
        for head in p.heads:
            c = p.cells.get((layer, head))
            if c is None:
                continue
            chosen = ", ".join(f"{s} ×{n}" if len(c.settings) > 1 else s
                               for s, n in sorted(c.settings.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"| {label(layer)} | {head} | {pct(c.ua)} | {pct(c.wa)} | {pct(c.macro_f1)} | "
                         f"{100 * c.val_ua:.1f} | {c.n} | {chosen} | {c.seconds:.0f} |")
    lines += ["", "</details>", ""]
    return lines


def _models_markdown(panels: list[Panel]) -> list[str]:
    """Caches of different encoders: each cache's best cells, then one table of every cache,
    layer and head with the model and the relative depth as columns."""
    heads = list(dict.fromkeys(h for p in panels for h in p.heads))

    def at(c: Cell, p: Panel) -> str:
        return label(c.layer) if is_multi(c.layer) else f"{c.layer} ({relative_depth(c.layer, p.last_state):.2f})"

    lines = ["## Models compared", "",
             "Depth = state / last state of the cache's encoder (0 = the input to the first block, 1 = the "
             f"encoder's output), so encoders of different depths line up ({DEPTH_PLOT}); multi-layer cells "
             "have none.", "",
             "| model | cache | states | best ★: layer (depth), head | UA % | best on validation †: layer (depth), "
             "head | UA % |", "|---|---|---:|---|---:|---|---:|"]
    for p in panels:
        best, best_val = p.best, p.best_val
        lines.append(f"| {p.encoder} | {p.name} | {p.last_state + 1} | {at(best, p)}, {best.head} | {pct(best.ua)} | "
                     f"{at(best_val, p)}, {best_val.head} | {pct(best_val.ua)} |")
    lines += ["", "UA % by model, layer and head (★ †: each cache's best cells):", "",
              "| model | cache | layer | depth | " + " | ".join(heads) + " |",
              "|---|---|---:|---:|" + "---:|" * len(heads)]
    for p in panels:
        best, best_val = p.best, p.best_val
        for layer in p.layers:
            depth = "–" if is_multi(layer) else f"{relative_depth(layer, p.last_state):.2f}"
            row = []
            for head in heads:
                c = p.cells.get((layer, head))
                row.append("–" if c is None else pct(c.ua) + (" ★" if c is best else "") + (" †" if c is best_val else ""))
            lines.append(f"| {p.encoder} | {p.name} | {label(layer)} | {depth} | " + " | ".join(row) + " |")
    return lines + [""]


def _test_corpus_markdown(p: Panel) -> list[str]:
    """Cross-corpus sweeps: in-corpus UA -> UA on the test cache, by layer and head."""
    if not any(c.test_corpus_ua for c in p.cells.values()):
        return []
    cross = p.sweep.config.get("cross_corpus") or {}
    test = cross.get("test_cache") or {}
    first = next(r.test_corpus for r in p.sweep.records if r.cache == p.cache and r.test_corpus)
    lines = [f"Cross-corpus: UA % in-corpus (test folds) → on all {first['n']} utterances of the test cache "
             f"({test.get('corpus')}, records {str(test.get('records_hash'))[:12]})"
             + (f", label map {cross['label_map']}" if cross.get("label_map") else "")
             + "; each fold's chosen head tested once on it, mean ± std over folds:", "",
             "| layer | " + " | ".join(p.heads) + " |", "|---:|" + "---:|" * len(p.heads)]
    for layer in p.layers:
        row = [f"{pct(c.ua)} → {pct(c.test_corpus_ua)}" if (c := p.cells.get((layer, head))) and c.test_corpus_ua
               else "–" for head in p.heads]
        lines.append(f"| {label(layer)} | " + " | ".join(row) + " |")
    return lines + [""]


def _weights_markdown(p: Panel) -> list[str]:
    """The learned weight of each state of every multi-layer cell, mean ± std over folds."""
    cells = [c for c in p.ordered() if c.layer_weights is not None]
    if not cells:
        return []
    lines = ["Layer weights of the mixing heads (softmax over the states of a multi-layer cell; mean ± std over "
             "folds and seeds; equal at the start). |w − 1/L|: the largest distance of a weight from equal, "
             "H/log L: the weights' entropy over its maximum (1: equal); both mean over folds:", ""]
    for c in cells:
        mean, std = c.layer_weights
        lines.append(f"- {label(c.layer)}, {c.head}: " + ", ".join(
            f"state {s} {m:.2f} ± {d:.2f}" for s, m, d in zip(states_of(c.layer), mean, std))
            + f"; |w − 1/L| {c.mix['max_dev']:.3f}, H/log L {c.mix['entropy']:.3f}: {c.mix['verdict']}.")
    return lines + [""]


def _arithmetic(p: Panel) -> list[str]:
    """The arithmetic the panel's cells were trained in, as recorded (auto resolves per machine)."""
    return sorted({r.compute_dtype for r in p.sweep.records if r.cache == p.cache})


def _training_line(config: dict, arithmetic: list[str]) -> str:
    t = config["train"]
    line = (f"Training: {t['epochs']} epochs (the epoch kept chosen on validation), batch "
            f"{t['batch_size']}, lr {t['lr']:g}, heads {t['n_heads']} x {t['head_dim']}")
    if t.get("patience"):
        score = "CCC" if t.get("task") == "regression" else "UA"
        line += f", stopped after {t['patience']} epochs without a better validation {score}"
    if t.get("time_mask"):
        line += f", time masking {t['time_mask']:g} of the training frames"
    if t.get("frame_pool", 0) > 1:
        line += f", every {t['frame_pool']} frames averaged ({20 * t['frame_pool']} ms) before the heads read them"
    if t.get("ensemble", 1) > 1:
        line += f", ensembles of {t['ensemble']} seeds per fold (mean probabilities)"
    if t.get("refit"):
        line += ", the chosen head retrained on training + validation speakers before the test (refit)"
    if t.get("compute_dtype", "float32") != "float32":  # auto or bfloat16: say what was used
        line += f", arithmetic {t['compute_dtype']} ({', '.join(arithmetic)})"
    if config["grid"]:
        grid = "; ".join(f"{k} {', '.join(str(v) for v in vs)}" for k, vs in config["grid"].items())
        line += f"; grid searched on validation: {grid}"
    return line + "."


def _timing_markdown(sweeps: list[Sweep]) -> list[str]:
    lines = ["## Time", "",
             "Reading: layers read from the cache (once per layer, in the main process). Training "
             "(with per-epoch validation) and test evaluation are summed over worker processes, so "
             "with several jobs they can exceed the wall time.", "",
             "| sweep | run started | jobs x threads | device | folds run | layers read | wall s | "
             "reading s | training s | evaluation s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in sweeps:
        for r in s.timing:
            lines.append(
                f"| {s.name} | {r.started} | {r.jobs} x {r.threads_per_job} | {r.device} | "
                f"{r.folds_run} of {r.folds_total} | {r.layers_read} | {r.wall_seconds:.0f} | "
                f"{r.read_seconds:.1f} | {r.train_seconds:.0f} | {r.eval_seconds:.1f} |")
    return lines + [""]


# --- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _state_axis(panels: list[Panel]) -> tuple[str, str]:
    """(the encoders in a plot's title, its state axis's label): Whisper's words for Whisper
    caches (as before other families were supported), the general ones otherwise."""
    if all(p.family in WHISPER_FAMILIES for p in panels) and not several_models(panels):
        return "Whisper encoder", "encoder state (0 = input embedding, last = after ln_post)"
    return "encoder", "encoder state (0 = input to the first block, last = the encoder's output)"


def _grid(n: int, width: float, height: float):
    plt = _pyplot()
    cols = min(n, PANEL_COLUMNS)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def plot_layers(panels: list[Panel], path: Path) -> None:
    """UA (%) against layer: one line per head with a ±std band, one panel per cache."""
    plt, fig, axes = _grid(len(panels), 6.4, 4.6)
    all_heads = list(dict.fromkeys(h for p in panels for h in p.heads))
    colors = {h: plt.get_cmap("tab10")(i) for i, h in enumerate(all_heads)}
    for ax, p in zip(axes, panels):
        single = [layer for layer in p.layers if not is_multi(layer)]
        for head in p.heads:
            cells = [p.cells[layer, head] for layer in single if (layer, head) in p.cells]
            if not cells:
                continue
            x = np.array([c.layer for c in cells])
            mean = 100 * np.array([c.ua[0] for c in cells])
            std = 100 * np.array([c.ua[1] for c in cells])
            ax.plot(x, mean, marker="o", color=colors[head], label=head)
            ax.fill_between(x, mean - std, mean + std, color=colors[head], alpha=0.15, linewidth=0)
            tested = [(c.layer, 100 * c.test_corpus_ua[0]) for c in cells if c.test_corpus_ua]
            if tested:  # cross-corpus: the same heads on the test cache, dashed
                ax.plot(*zip(*tested), marker="x", linestyle="--", color=colors[head], label=f"{head}, test cache")
        styles = iter([":", "-.", (0, (1, 3)), (0, (5, 2, 1, 2))] * 8)
        best = p.best
        for layer in [layer for layer in p.layers if is_multi(layer)]:  # no place on the axis: a level
            style = next(styles)
            for head in p.heads:
                if (layer, head) in p.cells:
                    c = p.cells[layer, head]
                    ax.axhline(100 * c.ua[0], color=colors[head], linestyle=style, linewidth=1.5,
                               label=f"{head} on {label(layer)}" + (" (best ★)" if c is best else ""))
        if not is_multi(best.layer):
            ax.plot([best.layer], [100 * best.ua[0]], marker="*", markersize=16, color=colors[best.head],
                    markeredgecolor="black", linestyle="none", label=f"best: layer {best.layer}, {best.head}")
        ax.axhline(100 / len(p.labels), color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(single)
        ax.set_xlabel(_state_axis(panels)[1])
        ax.set_ylabel("UA % (test, mean ± std over folds)")
        ax.set_title(f"{p.title}, {p.sweep.config['train']['epochs']} epochs", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Where emotion lives: UA by {_state_axis(panels)[0]} layer", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_depth(panels: list[Panel], path: Path) -> None:
    """UA (%) against relative depth (depth_curve: state / last state of its encoder) on one
    axis: one line per cache (colour) and head (line style, marker), a ±std band over folds,
    so encoders of different depths line up. Multi-layer cells have no depth: not drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 5.6))
    colors = {i: plt.get_cmap("tab10")(i % 10) for i in range(len(panels))}
    heads = list(dict.fromkeys(h for p in panels for h in p.heads))
    styles = {h: s for h, s in zip(heads, ["-", "--", "-.", ":"] * 4)}
    markers = {h: m for h, m in zip(heads, "osD^v<>ph*" * 2)}
    for i, p in enumerate(panels):
        for head in p.heads:
            depth, mean, std = depth_curve(p, head)
            if not len(depth):
                continue
            ax.plot(depth, 100 * mean, marker=markers[head], linestyle=styles[head], color=colors[i],
                    label=f"{p.encoder}, {head} ({p.name}, {p.last_state + 1} states)")
            ax.fill_between(depth, 100 * (mean - std), 100 * (mean + std), color=colors[i], alpha=0.12, linewidth=0)
    n_classes = sorted({len(p.labels) for p in panels})
    for n in n_classes:
        ax.axhline(100 / n, color="grey", linestyle="--", linewidth=1,
                   label="chance" if len(n_classes) == 1 else f"chance, {n} classes")
    ax.set_xlim(-0.03, 1.03)
    ax.set_xticks(np.linspace(0, 1, 5))
    ax.set_xlabel("relative depth: state / last state (0 = input to the first block, 1 = the encoder's output)")
    ax.set_ylabel("UA % (test, mean ± std over folds)")
    flawed = f" {FLAWED_LABEL}" if any(p.sweep.flawed for p in panels) else ""
    ax.set_title(f"Where emotion lives, model against model: UA by relative depth{flawed}", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(ax.get_lines()) > 10 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusions(panels: list[Panel], path: Path) -> None:
    """The best cell's confusion matrix per panel, rows normalised to 100 % (recall per class)."""
    plt, fig, axes = _grid(len(panels), 5.2, 4.8)
    for ax, p in zip(axes, panels):
        best = p.best
        counts = best.confusion.astype(np.float64)
        rows = counts.sum(axis=1, keepdims=True)
        norm = 100 * np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=100)
        n = len(p.labels)
        ax.set_xticks(range(n), p.labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), p.labels, fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 60 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (row = 100 %)")
        ax.set_title(f"{p.title}\nlayer {label(best.layer)}, {best.head}: UA {pct(best.ua)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_weights(panels: list[Panel], path: Path) -> None:
    """The learned softmax weight of each state (mean ± std over folds and seeds) of every
    multi-layer cell and head: one group of bars per state, one bar per cell and head, one
    panel per cache. Equal weights (1 / states) would mean no state is preferred. Each cell's
    label says how far its weights are from equal, and whether they stayed uniform (then they
    show no layer importance: the caption says so, and where to look instead)."""
    plt, fig, axes = _grid(len(panels), 6.4, 4.6)
    for ax, p in zip(axes, panels):
        cells = [c for c in p.ordered() if c.layer_weights is not None]
        states = sorted({s for c in cells for s in states_of(c.layer)})
        width = 0.8 / max(1, len(cells))
        for i, c in enumerate(cells):
            mean, std = c.layer_weights
            x = np.array([states.index(s) for s in states_of(c.layer)]) + (i - (len(cells) - 1) / 2) * width
            tag = "stayed uniform" if c.mix["uniform"] else "moved"
            ax.bar(x, mean, width, yerr=std, capsize=3,
                   label=f"{label(c.layer)}, {c.head}: |w−1/L| {c.mix['max_dev']:.3f}, {tag}")
            ax.hlines(1 / len(mean), x.min() - width / 2, x.max() + width / 2, colors="grey",
                      linestyles=":", linewidth=1)
        ax.set_xticks(range(len(states)), [str(s) for s in states])
        ax.set_xlabel(_state_axis(panels)[1])
        ax.set_ylabel("learned weight (mean ± std over folds)")
        ax.set_title(p.title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if cells:
            ax.legend(fontsize=8, loc="best", title="cell, head (dotted: equal weights)", title_fontsize=8)
    cells = [c for p in panels for c in p.cells.values() if c.mix is not None]
    if all(c.mix["uniform"] for c in cells):
        fig.suptitle("Layer weights of multi-layer heads:\nthey stayed uniform, and show no layer importance",
                     fontsize=11)
        caption = (f"Every cell's weights stayed within {UNIFORM_TOLERANCE:.0%} of equal in every fold: the mix "
                   "did not learn which states matter. Layer importance is the per-state curve (one state per cell, "
                   f"{LAYER_PLOT}).")
    else:
        fig.suptitle("Layer weights of multi-layer heads\n(learned; dotted: equal weights)", fontsize=11)
        caption = ("|w−1/L|: the largest distance from equal weights (mean over folds). Cells marked "
                   "\"stayed uniform\" show no layer importance; the per-state curve (one state per cell, "
                   f"{LAYER_PLOT}) does.")
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- regression sweeps ------------------------------------------------------------------------


def _ccc(pair) -> str:
    return "–" if np.isnan(pair[0]) else f"{pair[0]:.3f} ± {pair[1]:.3f}"


def regression_markdown(sweeps: list[Sweep], panels: list[Panel]) -> str:
    """A CCC table per target and panel (layer x head), the best cells, all cells, time spent."""
    names = ", ".join(s.name for s in sweeps)
    lines = [f"# Layer-wise regression sweep: {names}", "",
             "CCC = concordance correlation coefficient (1 = identical, 0 = no agreement), mean ± std over "
             "every fold of every seed (population std); Pearson r and MAE (in the targets' units) beside it. "
             "Epochs, the linear head's C and grid settings were chosen on the validation mean CCC over "
             "targets; the test speakers scored the choice once.", "",
             "★ best mean test CCC over targets in the panel (descriptive: the test folds pick it). "
             "† best mean validation CCC (the cell an honest selection would pick).", ""]
    lines[1:1] = flawed_warning(sweeps)
    for p in panels:
        lines += _regression_panel(p)
    lines += _timing_markdown(sweeps)
    return "\n".join(lines).rstrip() + "\n"


def _regression_panel(p: Panel) -> list[str]:
    f = p.folds
    best, best_val = p.best, p.best_val
    lines = [f"## {p.title}", "",
             f"{f['n_utterances']} utterances, targets {', '.join(p.labels)}; {f['n_folds']} {folds_kind(p)} "
             f"folds ({f['protocol']}) x seeds {f['seeds']}. {_training_line(p.sweep.config, _arithmetic(p))}", ""]
    for target in p.labels:
        lines += [f"CCC of {target} by layer (rows) and head (columns):", "",
                  "| layer | " + " | ".join(p.heads) + " |", "|---:|" + "---:|" * len(p.heads)]
        for layer in p.layers:
            row = []
            for head in p.heads:
                c = p.cells.get((layer, head))
                text = "–" if c is None else _ccc(c.targets[target]["ccc"])
                row.append(text + (" ★" if c is best else "") + (" †" if c is best_val else ""))
            lines.append(f"| {label(layer)} | " + " | ".join(row) + " |")
        lines.append("")
    lines += [f"Best cell ★: layer {label(best.layer)}, {best.head}: mean CCC {_ccc(best.ua)} ("
              + ", ".join(f"{t} {_ccc(best.targets[t]['ccc'])}" for t in p.labels) + f"; {best.n} fold results).",
              f"Best on validation †: layer {label(best_val.layer)}, {best_val.head}: validation CCC "
              f"{best_val.val_ua:.3f}, test mean CCC {_ccc(best_val.ua)}.", ""]
    lines += _weights_markdown(p)
    lines += ["<details><summary>All cells</summary>", "",
              "| layer | head | target | CCC | Pearson r | MAE | val CCC (mean) | folds x seeds | chosen on validation |",
              "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for c in p.ordered():
        chosen = ", ".join(f"{s} ×{n}" if len(c.settings) > 1 else s
                           for s, n in sorted(c.settings.items(), key=lambda kv: (-kv[1], kv[0])))
        for t in p.labels:
            m = c.targets[t]
            lines.append(f"| {label(c.layer)} | {c.head} | {t} | {_ccc(m['ccc'])} | {_ccc(m['pearson'])} | "
                         f"{_ccc(m['mae'])} | {c.val_ua:.3f} | {c.n} | {chosen} |")
    return lines + ["", "</details>", ""]


def plot_ccc(panels: list[Panel], path: Path) -> None:
    """Test CCC against layer: one curve per target (colour) and head (line style and marker),
    a ±std band over folds; one panel per cache. Multi-layer cells are dotted levels."""
    plt, fig, axes = _grid(len(panels), 6.4, 4.6)
    targets = list(dict.fromkeys(t for p in panels for t in p.labels))
    colors = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(targets)}
    heads = list(dict.fromkeys(h for p in panels for h in p.heads))
    styles = {h: s for h, s in zip(heads, ["-", "--", "-.", ":"] * 4)}
    markers = {h: m for h, m in zip(heads, "osD^v<>ph*" * 2)}
    for ax, p in zip(axes, panels):
        single = [layer for layer in p.layers if not is_multi(layer)]
        for head in p.heads:
            cells = [p.cells[layer, head] for layer in single if (layer, head) in p.cells]
            for t in p.labels if cells else ():
                x = np.array([c.layer for c in cells])
                mean = np.array([c.targets[t]["ccc"][0] for c in cells])
                std = np.array([c.targets[t]["ccc"][1] for c in cells])
                name = t if len(p.heads) == 1 else f"{t}, {head}"
                ax.plot(x, mean, marker=markers[head], linestyle=styles[head], color=colors[t], label=name)
                ax.fill_between(x, mean - std, mean + std, color=colors[t], alpha=0.12, linewidth=0)
            for layer in [layer for layer in p.layers if is_multi(layer) and (layer, head) in p.cells]:
                for t in p.labels:
                    ax.axhline(p.cells[layer, head].targets[t]["ccc"][0], color=colors[t], linestyle=":",
                               linewidth=1.2, label=f"{t}, {head} on {label(layer)}")
        ax.axhline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(single)
        ax.set_xlabel(_state_axis(panels)[1])
        ax.set_ylabel("CCC (test, mean ± std over folds)")
        ax.set_title(f"{p.title}, {p.sweep.config['train']['epochs']} epochs", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Where each dimension lives: CCC by {_state_axis(panels)[0]} layer", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
