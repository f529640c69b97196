"""Augmented views: copies of an utterance's audio changed in a well-understood, parameterised
way, encoded once at extraction (`extract --augment`) and stored in the cache beside it.

    speed=F   speed perturbation: the 16 kHz waveform read as if sampled at F * 16 kHz and
              resampled back to 16 kHz with soxr (as audio.py converts rates), so it lasts
              1 / F as long and every frequency moves by F (tempo and pitch together, the
              usual "speed perturbation" of ASR and SER). ceil(n / F) samples.
    noise=S   additive white Gaussian noise at S dB SNR against the utterance's own mean
              power, drawn from a generator seeded per source utterance and view
              (`view_seed`), so re-running, resuming or repairing gives the same samples.

A view is a record of its own (records.Utterance with `source` and `view` set): id
`<source id>~<view name>` (VIEW_SEPARATOR), the source's audio file, label, speaker, group and
targets, and a duration that follows the speed. The plan keeps every view in its source's
shard (cache.plan_shards), so resume, claims and --repair treat a source and its views as one.
Training never tests or validates on a view and adds views of its training utterances only
when asked (TrainConfig.views, folds.ViewRows).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import soxr

from .audio import SAMPLE_RATE
from .errors import OptionError
from .records import Utterance

TRANSFORMS = ("speed", "noise")  # the order views are named, planned and stored in
VIEW_SEPARATOR = "~"  # view id = source id + "~" + view name
SPEED_RANGE = (0.5, 2.0)  # factors outside it are refused: half or double speed is no longer the same speech
_NAME = re.compile(r"(speed|noise)(-?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class View:
    """One transform with its parameter: speed factor, or SNR in dB."""

    transform: str
    value: float

    @property
    def name(self) -> str:
        """'speed0.9', 'noise20': the view's name in ids, records and the cache settings."""
        return f"{self.transform}{self.value:g}"


def parse_augment(specs) -> list[str]:
    """--augment values ('speed=0.9,1.1', 'noise=20,10', several allowed) -> the view names in
    canonical order (by TRANSFORMS, then value), each once. OptionError naming the fix."""
    values: dict[str, set[float]] = {}
    for spec in specs:
        transform, _, listed = str(spec).partition("=")
        transform = transform.strip()
        if transform not in TRANSFORMS or not listed.strip():
            raise OptionError(f"--augment {spec!r}: write TRANSFORM=V[,V...] with TRANSFORM one of "
                              f"{', '.join(TRANSFORMS)}, e.g. speed=0.9,1.1 or noise=20")
        try:
            numbers = [float(v) for v in listed.split(",") if v.strip()]
        except ValueError:
            raise OptionError(f"--augment {spec!r}: the values must be numbers, e.g. {transform}=0.9,1.1") from None
        for v in numbers:
            check_view(View(transform, v))
        values.setdefault(transform, set()).update(numbers)
    return [View(t, v).name for t in TRANSFORMS for v in sorted(values.get(t, ()))]


def check_view(view: View) -> None:
    if not math.isfinite(view.value):
        raise OptionError(f"--augment {view.transform}={view.value}: give a finite number")
    if view.transform == "speed":
        low, high = SPEED_RANGE
        if not low <= view.value <= high or view.value == 1:
            raise OptionError(f"--augment speed={view.value:g}: a speed factor from {low:g} to {high:g}, not 1 "
                              "(1 is the original), e.g. speed=0.9,1.1")


def parse_view(name: str) -> View:
    """'speed0.9' -> View('speed', 0.9); the inverse of View.name."""
    m = _NAME.fullmatch(name)
    assert m, f"{name!r} is not a view name ({', '.join(TRANSFORMS)} and a number)"
    return View(m.group(1), float(m.group(2)))


def with_views(records: list[Utterance], views: list[str]) -> list[Utterance]:
    """`records` and, after each, its views (one record per view name): the records a cache with
    these views is planned from. Without views, `records` itself."""
    if not views:
        return records
    out = []
    for r in records:
        out.append(r)
        for name in views:
            view = parse_view(name)
            factor = view.value if view.transform == "speed" else 1.0
            out.append(replace(r, id=f"{r.id}{VIEW_SEPARATOR}{name}", source=r.id, view=name,
                               duration=r.duration / factor))
    return out


def view_seed(seed: int, source_id: str, view: str) -> list[int]:
    """The noise generator's seed for one view: the cache's augment seed, and a hash of the
    source id and view name (stable across runs, machines and Python's hash seed)."""
    digest = hashlib.sha256(f"{source_id}{VIEW_SEPARATOR}{view}".encode()).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """(n,) float32 16 kHz audio played `factor` times as fast: (ceil(n / factor),) float32.
    soxr rounds its output length; the last sample is repeated or cut to make it ceil(n / factor)."""
    out = soxr.resample(audio, SAMPLE_RATE * factor, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    n = math.ceil(len(audio) / factor)
    if len(out) < n:
        out = np.concatenate([out, np.full(n - len(out), out[-1] if len(out) else 0, dtype=np.float32)])
    return np.ascontiguousarray(out[:n])


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`audio` plus white Gaussian noise whose power is the audio's mean power / 10^(snr_db / 10).
    Digital silence stays silent (its power is 0)."""
    power = float(np.mean(np.square(audio, dtype=np.float64)))
    noise = rng.standard_normal(len(audio)) * math.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def apply_view(audio: np.ndarray, view: str, seed: int, source_id: str) -> np.ndarray:
    """The view `view` of a source utterance's 16 kHz audio (n,) float32."""
    v = parse_view(view)
    if v.transform == "speed":
        return speed(audio, v.value)
    return add_noise(audio, v.value, np.random.default_rng(view_seed(seed, source_id, view)))


def view_transform(record: Utterance, seed: int):
    """What to do to `record`'s 16 kHz audio before it is split into windows: None for an
    utterance of the corpus, else a function audio -> its view."""
    if not record.view:
        return None
    return lambda audio: apply_view(audio, record.view, seed, record.source)


def views_per_transform(records: list[Utterance]) -> dict[str, int]:
    """How many views each transform has among `records` ({"speed0.9": 24, ...}, by name)."""
    counts: dict[str, int] = {}
    for r in records:
        if r.view:
            counts[r.view] = counts.get(r.view, 0) + 1
    return counts
