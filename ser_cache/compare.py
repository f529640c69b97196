"""Paired comparisons: what one change bought, fold by fold, on the same test speakers.

    ser-cache compare BASELINE OTHER [OTHER ...]

Each argument is one result evaluated on every fold: a run folder (`ser-cache train --out RUN`)
or one cell of a sweep, written SWEEP:LAYER:HEAD (`sweeps/mix:0-6:qkv`, `sweeps/l:3:linear`;
SWEEP:LAYER:HEAD:CACHE when the sweep holds several caches; LAYER as `train --layer` takes it,
`all` meaning every state the sweep's cells use).

Fold scores of two results differ far more between folds (which actors are tested) than
between two heads on the same fold, so a difference of means with each side's std over folds
hides or invents effects. Paired on the same folds, the per-fold differences cancel the fold
effect: this prints their mean, std and range, how many folds improved, and an exact
sign-flip test (under "no effect", each fold's difference is as likely negative as positive;
the p-value is the share of the 2^n sign patterns whose mean difference is at least as far
from zero as the observed one). With 6 folds the smallest possible two-sided p is 2/64 = 0.031:
few folds can only show large, consistent effects.

Regression results (`--task regression`) are paired by CCC: `--metric ccc` (the mean over
targets) or `ccc_<target>` (`ccc_valence`); their differences are printed as CCC, not in
points of a percentage.

Two results are paired only when they were tested on the same folds: the same utterances in
each fold's training, validation and test parts (a digest of the sorted ids), and the same
seed per pair; anything else is refused, naming what differs. Several seeds pair seed by seed.
A FLAWED result (made with a compatibility switch, such as --compat-speaker-overlap) is never
paired with an honest one: the difference would measure the flaw, not the change. Two FLAWED
results may be paired with each other.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .folds import Folds
from .layers import as_selection, label, parse_selection, sort_key, states_of
from .results import ResultsError, RunFolder, SweepFolder
from .config import FLAWS, TrainConfig

METRICS = ("ua", "wa", "macro_f1")
REGRESSION_METRIC = "ccc"  # a regression result's mean CCC over targets; ccc_<target> per target
EXACT_FOLDS = 16  # up to 2^16 sign patterns are enumerated; beyond, a seeded Monte Carlo of 2^16


class CompareError(ResultsError):
    """Results that cannot be paired as asked; the message names the fix."""


@dataclass
class Scored:
    """One result on every fold: name as given, per-fold scores {(seed, fold): {metric: value}}
    in [0, 1], and per (seed, fold) the digest of that fold's split (`split_digest`)."""

    name: str
    scores: dict
    splits: dict
    flawed: list = field(default_factory=list)  # the flaws in words (config.FLAWS); [] when honest


def split_digest(folds: Folds, k: int) -> str:
    """SHA-256 of fold k's sorted training, validation and test ids: equal digests, same split
    (whatever order the utterances were stored in)."""
    parts = [sorted(folds.ids[i].tolist()) for i in folds.split(k)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def load_scored(spec: str) -> Scored:
    """A run folder, or SWEEP:LAYER:HEAD[:CACHE] (see the module docstring)."""
    path = Path(spec)
    if (path / RunFolder.CONFIG).is_file():
        return _from_run(spec, RunFolder(path))
    for n_fields in (3, 2):  # SWEEP:LAYER:HEAD:CACHE, then SWEEP:LAYER:HEAD
        root, *cell = spec.rsplit(":", n_fields)
        if len(cell) == n_fields and SweepFolder(Path(root)).is_sweep():
            return _from_sweep(spec, SweepFolder(Path(root)), *cell)
    if SweepFolder(path).is_sweep():
        raise CompareError(f"{spec} is a sweep: name one of its cells as {spec}:LAYER:HEAD, e.g. {spec}:3:linear")
    raise CompareError(f"{spec!r} is neither a run folder (with {RunFolder.CONFIG}) nor a sweep cell "
                       "SWEEP:LAYER:HEAD[:CACHE]")


def _from_run(name: str, folder: RunFolder) -> Scored:
    config = folder.read_config()
    folds = Folds.load(folder.root / RunFolder.FOLDS)
    seed = int(config.config.get("seed", 0))
    scores, splits = {}, {}
    for k in range(folds.n_folds):
        record = folder.read_fold(k)
        if record is None:
            continue
        scores[seed, k] = fold_scores(record.metrics)
        splits[seed, k] = split_digest(folds, k)
    if not scores:
        raise CompareError(f"{name} has no finished fold yet: finish the run first (re-run its command)")
    flawed = (config.flawed or ["compatibility switches"]) if config.flawed_compat else []
    return Scored(name, scores, splits, flawed)


def _from_sweep(name: str, folder: SweepFolder, layer_text: str, head: str, cache: str | None = None) -> Scored:
    cells = folder.cells()
    caches = sorted({c.cache for c in cells})
    if cache is None:
        if len(caches) > 1:
            raise CompareError(f"{folder.root} holds several caches ({', '.join(caches)}): name one, "
                               f"{folder.root}:{layer_text}:{head}:CACHE")
        cache = caches[0] if caches else ""
    states = {s for c in cells for s in states_of(c.layer)}
    layer = parse_selection(layer_text, max(states, default=0) + 1, option=f"{name}: LAYER")
    mine = [c for c in cells if c.cache == cache and c.head == head and as_selection(c.layer) == layer]
    if not mine:
        there = [f"{label(layer)}:{head}" for layer, head in
                 sorted({(as_selection(c.layer), c.head) for c in cells if c.cache == cache},
                        key=lambda cell: (sort_key(cell[0]), cell[1]))]
        raise CompareError(f"{folder.root} has no finished fold of layer {label(layer)}, head {head!r}"
                           f"{' in cache ' + cache if cache else ''}; its cells: {', '.join(there) or 'none'}")
    folds_by_seed = {}
    scores, splits = {}, {}
    for c in mine:
        if c.seed not in folds_by_seed:
            folds_by_seed[c.seed] = Folds.load(folder.folds_path(cache, c.seed))
        scores[c.seed, c.fold] = fold_scores(c.metrics)
        splits[c.seed, c.fold] = split_digest(folds_by_seed[c.seed], c.fold)
    return Scored(name, scores, splits, TrainConfig.from_dict(
        {k: v for k, v in folder.read_config()["train"].items() if k in FLAWS}).flaws())


def fold_scores(metrics: dict) -> dict:
    """The pairable scores of one fold's metrics (results.FoldRecord.metrics, of a run or a
    sweep cell alike): UA, WA, macro-F1 of classes, or of a regression
    (tasks.Regression.fold_metrics) the mean CCC and ccc_<target> per target; an undefined CCC
    (None, NaN) is left out."""
    if REGRESSION_METRIC not in metrics:
        return {m: float(metrics[m]) for m in METRICS}
    out = {REGRESSION_METRIC: float(metrics[REGRESSION_METRIC])}
    out.update({f"ccc_{t}": float(m["ccc"]) for t, m in metrics["targets"].items() if m["ccc"] is not None})
    return {k: v for k, v in out.items() if not np.isnan(v)}


def sign_flip_p(diffs: np.ndarray, seed: int = 0) -> float:
    """Two-sided p of the mean of paired differences `diffs` (n,) under random signs: exact
    over all 2^n patterns up to EXACT_FOLDS differences, else 2^EXACT_FOLDS seeded draws."""
    n = len(diffs)
    observed = abs(diffs.mean())
    if n <= EXACT_FOLDS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(1 << EXACT_FOLDS, n))
    means = np.abs(signs @ diffs) / n
    return float((means >= observed - 1e-12).mean())


def paired(base: Scored, other: Scored, metric: str = "ua") -> dict:
    """The paired difference other - base over their common (seed, fold)s, in [0, 1] units.

    Raises CompareError when they share no fold, or when a shared fold was split differently.
    """
    if bool(base.flawed) != bool(other.flawed):
        flawed, honest = (base, other) if base.flawed else (other, base)
        raise CompareError(f"{flawed.name} is FLAWED ({'; '.join(flawed.flawed)}) and {honest.name} is honest: "
                           "their difference would measure the flaw, not the change; compare FLAWED results "
                           "only with each other")
    common = sorted(set(base.scores) & set(other.scores))
    if not common:
        raise CompareError(f"{base.name} and {other.name} share no (seed, fold): compare results of the same "
                           f"seeds (folds {sorted(base.scores)} against {sorted(other.scores)})")
    differ = [key for key in common if base.splits[key] != other.splits[key]]
    if differ:
        seed, fold = differ[0]
        raise CompareError(f"{base.name} and {other.name} were not tested on the same folds (seed {seed}, "
                           f"fold {fold} holds other utterances): pair results built from the same cache "
                           "with the same protocol, fold count and seed")
    for result in (base, other):
        have = sorted(set.intersection(*(set(result.scores[key]) for key in common)))
        if metric not in have:
            raise CompareError(f"{result.name} has no {metric!r} on every fold; it has {', '.join(have)}: "
                               "pass --metric with one of those (ccc, ccc_<target> for regression results)")
    a = np.array([base.scores[key][metric] for key in common])
    b = np.array([other.scores[key][metric] for key in common])
    d = b - a
    return {"base": base.name, "other": other.name, "metric": metric, "n": len(common),
            "base_mean": float(a.mean()), "other_mean": float(b.mean()), "diff_mean": float(d.mean()),
            "diff_std": float(d.std()), "diff_min": float(d.min()), "diff_max": float(d.max()),
            "better": int((d > 0).sum()), "worse": int((d < 0).sum()), "p": sign_flip_p(d),
            "unpaired": sorted(set(base.scores) ^ set(other.scores))}


def compare(specs: list[str], metric: str = "ua") -> list[dict]:
    """Every result of specs[1:] paired against specs[0] (see `paired`)."""
    if len(specs) < 2:
        raise CompareError("give a baseline and at least one result to compare with it")
    base, *others = [load_scored(s) for s in specs]
    return [paired(base, o, metric) for o in others]


def table(rows: list[dict]) -> str:
    """The comparisons as text, in percentage points (CCC as it is)."""
    if not rows:
        return ""
    metric = rows[0]["metric"]
    ccc = metric.startswith(REGRESSION_METRIC)
    scale, digits = (1, 3) if ccc else (100, 1)
    unit = "as CCC" if ccc else "in %, paired differences in points"
    lines = [f"baseline: {rows[0]['base']}  ({metric} {unit}, other - baseline, over the same folds)",
             (f"{'result':<40} {'n':>3} {'baseline':>8} {'result':>7} {'diff':>14} {'range':>15} "
              f"{'better':>6} {'p':>6}")]
    for r in rows:
        def v(key, width, sign=""):
            return f"{scale * r[key]:{sign}{width}.{digits}f}"

        lines.append(f"{r['other'][-40:]:<40} {r['n']:>3} {v('base_mean', 8)} {v('other_mean', 7)} "
                     f"{v('diff_mean', 7, '+')} ± {v('diff_std', 4)} "
                     f"{v('diff_min', 6, '+')}..{v('diff_max', 5, '+')} "
                     f"{r['better']:>3}/{r['n']:<2} {r['p']:6.3f}")
        if r["unpaired"]:
            lines.append(f"{'':<40} (not in both, left out: (seed, fold) {r['unpaired']})")
    lines.append("p: exact two-sided sign-flip test of the mean difference (compare.py); better: folds where "
                 "the result beats the baseline")
    return "\n".join(lines)
