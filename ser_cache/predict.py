"""Predict emotions in new audio with an exported head (exporting.py writes the file).

    model.pt --load_predictor + encoder--> Predictor --predict_file--> FilePrediction

Prediction follows extraction exactly: same input mode, same encoder arithmetic, states rounded
to the cache's storage dtype and, for several layers, stacked in each row as the cache reader
stacks them, so the head sees what it was trained on. The encoder runs only up to the highest
layer the head needs (`encode` stops there; later blocks are never computed). Recordings longer
than 30 s are cut into consecutive 30 s windows, each gets its own probabilities, and the
file's probabilities are the mean of the windows' weighted by their duration (a 2 s tail
window counts 2/30 of a full one, so a few seconds at the end cannot sway a long recording).

"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, WINDOW_SAMPLES, AudioError, load_utterance
from .batches import predict_proba
from .encoder import FAMILY_LABELS, OPENAI_WHISPER, LoadedEncoder, encoder_input, load_encoder, same_states_family
from .errors import UserError
from .exporting import EXPORT_FORMAT, EXPORT_KIND, MULTI_LAYER_FORMAT
from .extract import encode_batch
from .features import LayerData
from .heads import Head, rebuild_head
from .layers import Selection, as_selection, states_of

READ_FORMATS = (EXPORT_FORMAT, MULTI_LAYER_FORMAT)
WINDOW_BATCH = 8  # 30 s windows per encoder forward when predicting a long recording


class PredictError(UserError):
    """An export or prediction that cannot be done as asked; the message names the fix."""


@dataclass
class Exported:
    """An exported head, rebuilt. `model` is a head (heads.Head) in eval mode."""

    model: Head
    head: str
    labels: list[str]  # the classes, or a regression head's targets
    layer: Selection  # a state, or a tuple of the states a multi-layer head mixes
    mode: str
    dtype: str
    compute_dtype: str
    encoder: dict  # {"family", "name", "sha256", "dims", "path"}
    provenance: dict
    kwargs: dict
    task: str = "classification"  # or "regression": the head predicts target values
    frame_pool: int = 1  # encoder frames averaged into each frame the head reads (pooling.py)

    @property
    def regression(self) -> bool:
        return self.task == "regression"


def load_exported(path: Path) -> Exported:
    """Rebuild the head of a file written by `export_run` (weights_only: no code is unpickled)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PredictError(f"{path} is not a file written by `ser-cache export` ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict) or saved.get("kind") != EXPORT_KIND:
        raise PredictError(f"{path} is not a file written by `ser-cache export` (a fold_K.pt of a run? "
                           "export it first: ser-cache export RUN --fold K --out model.pt)")
    if saved.get("format") not in READ_FORMATS:
        raise PredictError(f"{path}: export format {saved.get('format')}, this version reads {READ_FORMATS}: "
                           "export the run again with this version (`ser-cache export RUN --out FILE`)")
    kwargs = dict(saved["kwargs"])
    try:
        model = rebuild_head(saved["head"], kwargs, saved.get("members"))
        model.load_state_dict(saved["state_dict"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise PredictError(f"{path}: the head in it cannot be rebuilt ({str(e).splitlines()[0]}); export the run "
                           "again with this version") from None
    model.eval()
    return Exported(model, saved["head"], list(saved["labels"]), as_selection(saved["layer"]), saved["mode"], saved["dtype"],
                    saved["compute_dtype"], _encoder_record(saved), dict(saved["provenance"]), kwargs,
                    saved.get("task", "classification"),  # files exported before tasks: classes
                    int(saved.get("frame_pool", 1)))  # files exported before pooling: every frame


def _encoder_record(saved: dict) -> dict:
    """The exported encoder's {"family", "name", "sha256", "dims", "path"}; files exported
    before other encoders were supported call it "whisper" and are openai-whisper's."""
    if "encoder" in saved:
        return dict(saved["encoder"])
    return {"family": OPENAI_WHISPER, **saved["whisper"]}


# --- predicting ------------------------------------------------------------------------------


@dataclass
class WindowPrediction:
    start: float  # seconds
    end: float
    probs: np.ndarray  # (n_classes,) probabilities, or (n_targets,) values of a regression head


@dataclass
class FilePrediction:
    """One audio file's result: its windows and overall probabilities, or why it failed."""

    path: str
    windows: list[WindowPrediction] = field(default_factory=list)
    probs: np.ndarray | None = None  # (n_classes,) or (n_targets,), duration-weighted mean of the windows'
    notes: list[str] = field(default_factory=list)
    error: str = ""


class Predictor:
    """An exported head plus the encoder it was trained on, ready for audio files.

    early_stop=False runs every encoder block and then picks the head's layers: the same
    result, slower; it exists to check and measure the early stop.
    """

    def __init__(self, exported: Exported, enc: LoadedEncoder, device: str | torch.device = "cpu",
                 early_stop: bool = True):
        self.exported, self.enc, self.device, self.early_stop = exported, enc, torch.device(device), early_stop
        exported.model.to(self.device)

    @property
    def labels(self) -> list[str]:
        return self.exported.labels

    def states(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """The head's layer for each 16 kHz window: [(frames, dim)] in the cache's dtype,
        computed as `ser-cache extract` computed the training states; for a head on several
        layers, [(frames, n_states * dim)], the states side by side as Cache.read_layer
        stacks them. The encoder stops after the highest of them."""
        ex = self.exported
        wanted = states_of(ex.layer)
        keep = wanted if self.early_stop else list(range(self.enc.n_states))
        out = []
        for start in range(0, len(windows), WINDOW_BATCH):
            chunk = windows[start : start + WINDOW_BATCH]
            batch = [(0, i, *encoder_input(self.enc, w, ex.mode)) for i, w in enumerate(chunk)]
            for s in encode_batch(self.enc, batch, ex.mode, keep, ex.dtype, self.device, ex.compute_dtype):
                out.append(s[wanted[0]] if len(wanted) == 1 else np.concatenate([s[k] for k in wanted], axis=1))
        return out

    def head_probs(self, states: list[np.ndarray]) -> np.ndarray:
        """(n_windows, n_classes) class probabilities (a regression head: (n_windows, n_targets)
        values) from per-window states [(frames, width)]."""
        lengths = np.array([len(s) for s in states])
        blank = np.array([""] * len(states))
        data = LayerData(frames=np.concatenate(states), offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                         ids=np.array([str(i) for i in range(len(states))]), labels=blank, speakers=blank,
                         groups=blank, layer=self.exported.layer).pooled(self.exported.frame_pool)
        return predict_proba(self.exported.model, data, np.arange(len(states)), self.device)

    def predict_audio(self, windows: list[np.ndarray]) -> tuple[list[WindowPrediction], np.ndarray]:
        """Per-window predictions and the file's probabilities (duration-weighted mean)."""
        probs = self.head_probs(self.states(windows))
        seconds = np.array([len(w) for w in windows]) / SAMPLE_RATE
        starts = np.arange(len(windows)) * (WINDOW_SAMPLES / SAMPLE_RATE)
        preds = [WindowPrediction(float(s), float(s + d), p) for s, d, p in zip(starts, seconds, probs)]
        return preds, (probs * seconds[:, None]).sum(axis=0) / seconds.sum()

    def predict_file(self, path) -> FilePrediction:
        """Read, window and classify one file; a file that cannot be used gets `error` set."""
        try:
            windows, notes = load_utterance(str(path), long_policy="windows")
        except AudioError as e:
            return FilePrediction(str(path), error=e.reason)
        preds, probs = self.predict_audio(windows)
        return FilePrediction(str(path), preds, probs, notes)


def load_predictor(model_file: Path, whisper_model: str | None = None, allow_other_model: bool = False,
                   device: str | torch.device = "cpu", early_stop: bool = True) -> Predictor:
    """An exported head with its encoder: `whisper_model` (a Whisper name or checkpoint path,
    a transformers model folder or hub id), else the checkpoint file or model folder recorded at
    extraction if it still holds the same bytes, else the model name recorded in the file.
    Refuses a model whose SHA-256 is not the one the head was trained on unless
    allow_other_model; a model of another family or shape is always refused."""
    from .encoder import CheckpointError, model_sha256
    from .hf_encoders import EncoderError

    ex = load_exported(model_file)
    want = ex.encoder
    recorded = want.get("path")  # None for a model name; absent from files exported before it was kept
    name = whisper_model
    if name is None:
        # Hashed before loading: another model at that path would only be refused below,
        # whereas the recorded name may still find the right one.
        same = bool(recorded) and model_sha256(recorded) == want["sha256"]
        name = recorded if same else want["name"]
    try:
        enc = load_encoder(name, device=device)
    except (CheckpointError, EncoderError) as e:
        raise PredictError(str(e)) from None
    except ValueError as e:
        if whisper_model is None:
            openai = want["family"] == OPENAI_WHISPER
            what, kind = ("a model name Whisper can download", "checkpoint") if openai else ("a hub id", "model")
            where = f" (and the {kind} recorded at {recorded} is missing or has other bytes)" if recorded else ""
            raise PredictError(f"the head was trained on states of {FAMILY_LABELS[want['family']]} {want['name']!r} "
                               f"(sha256 {want['sha256'][:12]}...), which is not {what}{where}: pass --model PATH "
                               f"to that {kind}") from None
        raise PredictError(str(e)) from None
    except (OSError, RuntimeError) as e:
        raise PredictError(f"cannot load Whisper {name!r} ({e}); offline, pass --model PATH to the checkpoint "
                           f"(sha256 {want['sha256'][:12]}...)") from None
    if enc.sha256 != want["sha256"] and not allow_other_model:
        raise PredictError(
            f"model {name!r} has sha256 {enc.sha256[:12]}..., but the head was trained on states of "
            f"{want['name']!r} (sha256 {want['sha256'][:12]}...): its predictions would be meaningless. "
            "Pass --model with the right checkpoint, or --allow-other-model if you know the weights are equivalent"
        )
    if same_states_family(enc.family) != same_states_family(want["family"]):
        raise PredictError(f"model {name!r} is a {enc.family} encoder, the head read states of a {want['family']} "
                           "encoder: pass --model with the model it was trained on")
    for key in ("n_mels", "n_audio_state", "n_audio_layer", "hop_samples", "do_normalize"):
        if enc.dims.get(key) != want["dims"].get(key):
            raise PredictError(f"model {name!r} has {key} {enc.dims.get(key)}, the head needs {want['dims'].get(key)}: "
                               "the head cannot read its states; pass --model with the model it was trained on")
    return Predictor(ex, enc, device, early_stop)


# --- output ----------------------------------------------------------------------------------


def _span(w: WindowPrediction) -> str:
    return f"{w.start:.1f}-{w.end:.1f} s"


def format_table(results: list[FilePrediction], labels: list[str], regression: bool = False) -> str:
    """One row per file (and per window of a file over 30 s, then its overall row), with the
    predicted emotion and every class probability (regression: every target's value); failed
    files say why."""
    def emotion(p):
        return "" if regression else labels[int(p.argmax())]

    rows = []
    for r in results:
        if r.error:
            rows.append((r.path, "", "ERROR", None, r.error))
            continue
        if len(r.windows) > 1:
            rows += [(r.path, _span(w), emotion(w.probs), w.probs, "") for w in r.windows]
            span = f"all {r.windows[-1].end:.1f} s"
        else:
            span = _span(r.windows[0])
        rows.append((r.path, span, emotion(r.probs), r.probs, "; ".join(r.notes)))
    wf = max([4] + [len(row[0]) for row in rows])
    ws = max([6] + [len(row[1]) for row in rows])
    we = 0 if regression else max([7] + [len(lab) for lab in labels])
    wp = [max(5, len(lab)) for lab in labels]
    gap = "" if regression else "  "
    head = "" if regression else f"{'emotion':<{we}}"
    lines = [f"{'file':<{wf}}  {'window':<{ws}}  {head}{gap}" + "  ".join(f"{lab:>{w}}" for lab, w in zip(labels, wp))]
    for path, span, predicted, probs, note in rows:
        if probs is None:
            lines.append(f"{path:<{wf}}  {span:<{ws}}  ERROR: {note}")
            continue
        line = (f"{path:<{wf}}  {span:<{ws}}  {predicted:<{we}}{gap}"
                + "  ".join(f"{p:>{w}.3f}" for p, w in zip(probs, wp)))
        lines.append(line + (f"  ({note})" if note else ""))
    return "\n".join(lines)


def predictions_json(results: list[FilePrediction], labels: list[str], regression: bool = False) -> str:
    """A JSON list, one object per file: prediction, probabilities, windows, notes or error;
    a regression head's: "values" ({target: value}) in place of prediction and probabilities."""
    def probs(p):
        return {lab: round(float(v), 6) for lab, v in zip(labels, p)}

    def outputs(p):
        if regression:
            return {"values": probs(p)}
        return {"prediction": labels[int(p.argmax())], "probabilities": probs(p)}

    out = []
    for r in results:
        if r.error:
            out.append({"file": r.path, "error": r.error})
            continue
        out.append({
            "file": r.path,
            **outputs(r.probs),
            "windows": [{"start": w.start, "end": round(w.end, 3), **outputs(w.probs)} for w in r.windows],
            "notes": r.notes,
        })
    return json.dumps(out, indent=1, ensure_ascii=False)
