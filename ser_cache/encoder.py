"""Whisper's audio encoder, run so that every intermediate state can be kept.

State numbering (the paper's, and Hugging Face's hidden_states): state 0 is the input embedding (two convolutions plus the
positional embedding), state i is the output of block i, and the last state (n = number of
blocks) is the last block's output after the final LayerNorm `ln_post`. n + 1 states in all.

Three input modes decide what the encoder sees and what is kept:

    padded  30 s window, all 1500 frames kept              (the paper's layout)
    trim    30 s window, only the speech frames kept       (ceil(samples / 320) frames)
    short   only the speech frames are encoded              (positional embedding sliced)

`short` changes the states slightly (self-attention no longer sees the padding) and is several
times faster on short clips. Utterances of different lengths are batched with a key-padding
mask and zeroed convolution inputs, so a batched `short` run gives the states an unbatched one
would.

`load_encoder` also takes a transformers model (a folder, a hub id or a short name such as
wavlm-large): Whisper, WavLM, HuBERT, wav2vec2 or data2vec-audio, with the same state numbering
(hf_encoders.py). `encoder_input` and `run_encoder` are what the rest of the code calls: they
give each family its own input (log-mel or waveform) and forward.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import hf_encoders
from .audio import SAMPLES_PER_FRAME, WINDOW_SAMPLES
from .errors import OptionError, UserError

MODES = ("padded", "trim", "short")
OPENAI_WHISPER = "openai-whisper"  # the family of openai-whisper checkpoints
# How messages name each family's models (hf_encoders.FAMILIES holds the transformers ones).
FAMILY_LABELS = {OPENAI_WHISPER: "Whisper", "whisper": "Whisper (transformers)", "wavlm": "WavLM",
                 "hubert": "HuBERT", "wav2vec2": "wav2vec2", "data2vec-audio": "data2vec-audio"}
N_WINDOW_FRAMES = WINDOW_SAMPLES // SAMPLES_PER_FRAME  # 1500 encoder frames in 30 s
ENCODER_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")
EXPECTED_CHECKPOINT = ("expected a Whisper checkpoint: a torch file holding a dict with 'dims' and "
                       "'model_state_dict', as openai-whisper's .pt files do; pass one, or a model name "
                       "such as base")


class CheckpointError(UserError, ValueError):
    """A file that is not a usable Whisper checkpoint; the message names it and what was expected."""


@dataclass
class LoadedEncoder:
    """A speech encoder (Whisper's audio encoder, or a transformers model) with what identifies it.

    name: what the user asked for (a model name, or a checkpoint file name).
    sha256: hex digest of the checkpoint file's bytes (a transformers model: of its folder's
      config and weight files, hf_encoders.folder_sha256).
    dims: the checkpoint's ModelDimensions as a dict (n_mels, n_audio_state, ...); every family
      has n_audio_state (the width of a state) and n_audio_layer (the blocks).
    path: the checkpoint file's absolute path, or None for a model name (openai-whisper's
      download folder holds it); a transformers model's folder.
    family: "openai-whisper", or a transformers model_type (hf_encoders.FAMILIES).
    """

    encoder: torch.nn.Module
    name: str
    sha256: str
    dims: dict
    path: str | None = None
    family: str = OPENAI_WHISPER

    @property
    def n_states(self) -> int:
        return self.dims["n_audio_layer"] + 1

    @property
    def dim(self) -> int:
        return self.dims["n_audio_state"]

    @property
    def waveform(self) -> bool:
        """True for encoders that read the waveform itself (WavLM, HuBERT, wav2vec2, data2vec)."""
        return self.family in hf_encoders.WAVEFORM_FAMILIES


def _whisper():
    try:
        import whisper
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "openai-whisper is not installed: run `make install`, or "
            "`pip install --no-deps openai-whisper` plus more-itertools numba tiktoken"
        ) from e
    return whisper


def checkpoint_bytes(name_or_path: str, download_root: str | None = None) -> tuple[bytes, str, Path | None]:
    """The raw checkpoint, a display name and the file's absolute path (None for a model name).

    A name such as "base" is fetched (or taken from the download folder) by openai-whisper,
    which checks the SHA-256 that its download address carries.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_bytes(), path.stem, path.absolute()
    whisper = _whisper()
    if name_or_path not in whisper._MODELS:
        raise OptionError(
            f"{name_or_path!r} is neither a checkpoint file, a model folder, a hub id nor a model name; "
            f"Whisper names: {', '.join(whisper.available_models())}"
        )
    root = download_root or os.path.join(os.path.expanduser("~"), ".cache", "whisper")
    return whisper._download(whisper._MODELS[name_or_path], root, in_memory=True), name_or_path, None


def load_encoder(name_or_path: str, device: str | torch.device = "cpu", download_root: str | None = None) -> LoadedEncoder:
    """Load only the audio encoder, in float32, in eval mode: of a Whisper checkpoint (a file
    or an openai-whisper name), or of a transformers model (a folder, a hub id or a short name;
    hf_encoders.load_hf_encoder).

    Raises CheckpointError when the file is not a Whisper checkpoint whose encoder fits its dims,
    hf_encoders.EncoderError when a transformers model cannot be loaded.
    """
    if not Path(name_or_path).expanduser().is_file() and name_or_path not in _whisper()._MODELS \
            and hf_encoders.is_hf_source(name_or_path):
        return LoadedEncoder(**hf_encoders.load_hf_encoder(name_or_path, device))
    raw, name, path = checkpoint_bytes(name_or_path, download_root)
    source = str(path) if path else f"Whisper {name!r}"
    sha = hashlib.sha256(raw).hexdigest()
    ckpt = read_checkpoint(raw, source)
    del raw
    dims = ckpt["dims"]
    encoder = build_encoder(dims)
    prefix = "encoder."
    state = {k[len(prefix) :]: v for k, v in ckpt["model_state_dict"].items() if str(k).startswith(prefix)}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or wrongly shaped weights
        shape = {k: dims[k] for k in ENCODER_DIMS}
        raise _refused(source, f"its encoder weights do not fit its dims {shape}: {_first_problem(e)}") from None
    encoder.to(device).eval()
    return LoadedEncoder(encoder=encoder, name=name, sha256=sha, dims=dict(dims),
                         path=str(path) if path else None)


def read_checkpoint(raw: bytes, source: str) -> dict:
    """A checkpoint's {"dims": {...}, "model_state_dict": {...}}, checked, from its bytes.

    Loaded with weights_only=True: tensors and plain values only. A pickled object (which could
    run code the moment it is loaded) is refused, never executed. source: the file, for messages.
    """
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files it is about to refuse anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch says the same for random bytes and for a forbidden object, so both are named
        raise _refused(source, "it is damaged, or holds pickled objects other than tensors and plain "
                       "values, refused because loading them could run code") from None
    except Exception as e:  # a damaged file surfaces as RuntimeError, EOFError, KeyError, ...
        raise _refused(source, f"it cannot be read as a torch file: {_first_problem(e)}; truncated, or not a checkpoint") from None
    if not isinstance(ckpt, dict) or not {"dims", "model_state_dict"} <= set(ckpt):
        held = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise _refused(source, f"it holds {held}")
    dims = ckpt["dims"]
    if not isinstance(dims, dict):
        raise _refused(source, f"its dims are a {type(dims).__name__}, not a dict")
    bad = [k for k in ENCODER_DIMS if not (type(dims.get(k)) is int and dims[k] > 0)]
    if bad:
        raise _refused(source, f"its dims lack positive integers {bad} (found {dims})")
    if not isinstance(ckpt["model_state_dict"], dict):
        raise _refused(source, f"its model_state_dict is a {type(ckpt['model_state_dict']).__name__}, not a dict")
    return ckpt


def _refused(source: str, why: str) -> CheckpointError:
    return CheckpointError(f"{source} is not a Whisper checkpoint ({why}); {EXPECTED_CHECKPOINT}")


def _first_problem(e: Exception) -> str:
    """The first sentence of an exception's first informative line, at most 160 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    # load_state_dict's message starts with a header line; the problem is on the next one
    line = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= 160 else line[:157] + "..."


def build_encoder(dims: dict) -> torch.nn.Module:
    """A randomly initialised openai-whisper AudioEncoder of the given dimensions."""
    from whisper.model import AudioEncoder

    return AudioEncoder(
        dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"], dims["n_audio_head"], dims["n_audio_layer"]
    )


def speech_frames(n_samples: int) -> int:
    """Encoder frames that cover n_samples of 16 kHz audio: one per 320 samples, rounded up."""
    return math.ceil(n_samples / SAMPLES_PER_FRAME)


def log_mel(audio: np.ndarray, n_mels: int, mode: str) -> torch.Tensor:
    """Whisper's log-mel input for one window of 16 kHz audio.

    audio: (samples,) float32, at most 30 s. Returns (n_mels, 2 * frames) float32, where
    frames is 1500 for padded/trim and speech_frames(samples) for short.
    Computed one utterance at a time on purpose: Whisper's log-mel clamps relative to the
    loudest bin of its input, so batching audio would couple utterances.
    """
    from whisper.audio import log_mel_spectrogram

    assert len(audio) <= WINDOW_SAMPLES, f"window of {len(audio)} samples is over 30 s"
    target = WINDOW_SAMPLES if mode in ("padded", "trim") else speech_frames(len(audio)) * SAMPLES_PER_FRAME
    padded = np.zeros(target, dtype=np.float32)
    padded[: len(audio)] = audio
    return log_mel_spectrogram(torch.from_numpy(padded), n_mels=n_mels)


def _attention(attn, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Whisper's self-attention with an optional key-padding mask (B, T) bool, True = real."""
    b, t, d = x.shape
    heads = attn.n_head
    q, k, v = (proj(x).view(b, t, heads, d // heads).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.out(a.transpose(1, 2).flatten(start_dim=2))


def _block(block, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """One ResidualAttentionBlock, as openai-whisper computes it, plus the key mask."""
    x = x + _attention(block.attn, block.attn_ln(x), key_mask)
    return x + block.mlp(block.mlp_ln(x))


@torch.inference_mode()
def encode(encoder, mel: torch.Tensor, n_frames: torch.Tensor | None, keep: list[int]) -> dict[int, torch.Tensor]:
    """Run the encoder and return the states listed in `keep`.

    mel: (B, n_mels, 2T) log-mel, zero beyond each utterance's 2 * n_frames[b] columns.
    n_frames: (B,) valid encoder frames per utterance, or None when every column is real
      input (padded and trim modes, where the whole 30 s window is encoded).
    keep: state indices, 0..n_blocks. Blocks after the last kept state are not run.
    Returns {state: (B, T, dim)} in the encoder's dtype.
    """
    n_blocks = len(encoder.blocks)
    assert keep and all(0 <= s <= n_blocks for s in keep), f"states {keep} outside 0..{n_blocks}"
    t = mel.shape[-1] // 2
    key_mask = None
    if n_frames is not None:
        key_mask = torch.arange(t, device=mel.device)[None, :] < n_frames[:, None]  # (B, T)
        mel_mask = torch.arange(2 * t, device=mel.device)[None, :] < 2 * n_frames[:, None]
    x = F.gelu(encoder.conv1(mel))
    if key_mask is not None:
        # An unbatched short utterance sees zero padding after its last column in conv2; zero
        # conv1's output past it so batch neighbours do not leak in.
        x = x * mel_mask[:, None, :].to(x.dtype)
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = (x + encoder.positional_embedding[:t]).to(x.dtype)
    states = {}
    if 0 in keep:
        states[0] = x
    for i, block in enumerate(encoder.blocks[: max(keep)], start=1):
        x = _block(block, x, key_mask)
        if i in keep and i < n_blocks:
            states[i] = x
    if n_blocks in keep:
        states[n_blocks] = encoder.ln_post(x)
    return states


def encoder_input(enc: LoadedEncoder, audio: np.ndarray, mode: str) -> tuple[torch.Tensor, int]:
    """One window of 16 kHz audio as `enc` reads it, and the encoder frames of its speech:
    Whisper's log-mel (n_mels, 2 * frames or 3000) and speech_frames; a waveform encoder's
    (samples,) normalised as the model wants and its convolutions' frame count (0 for a window
    shorter than their receptive field)."""
    if enc.waveform:
        return hf_encoders.waveform_input(audio, enc.dims), hf_encoders.waveform_frames(len(audio), enc.dims)
    return log_mel(audio, enc.dims["n_mels"], mode), speech_frames(len(audio))


def run_encoder(enc: LoadedEncoder, inputs: list[torch.Tensor], frames: list[int], mode: str,
                keep: list[int]) -> dict[int, torch.Tensor]:
    """Encode a batch of windows made by encoder_input and return the states listed in `keep`.

    Returns {state: (B, T, dim)}: T = 1500 for Whisper's padded and trim modes, else the most
    frames of any window; rows past a window's own frames are padding. Blocks after the last
    kept state are not run.
    """
    if enc.waveform:
        return hf_encoders.encode_waveform(enc.encoder, enc.family, enc.dims, inputs, keep)
    run = encode if enc.family == OPENAI_WHISPER else hf_encoders.encode_whisper
    device = next(enc.encoder.parameters()).device
    if mode != "short":  # the whole 30 s window is input: nothing to mask
        return run(enc.encoder, torch.stack(inputs).to(device), None, keep)
    width = max(m.shape[-1] for m in inputs)
    x = torch.zeros(len(inputs), inputs[0].shape[0], width)
    for i, m in enumerate(inputs):
        x[i, :, : m.shape[-1]] = m
    return run(enc.encoder, x.to(device), torch.tensor(frames, device=device), keep)


def same_states_family(family: str) -> str:
    """The family whose states `family` computes: openai-whisper and transformers' Whisper
    compute the same ones from the same weights (whisper_to_hf.py), any other only its own."""
    return "whisper" if family == OPENAI_WHISPER else family


def model_sha256(path: str) -> str | None:
    """The SHA-256 load_encoder gives the model at `path` (a checkpoint file, or a transformers
    model folder), without loading it; None when nothing usable is there."""
    from .cache import file_sha256

    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    try:
        return hf_encoders.folder_sha256(p) if (p / "config.json").is_file() else None
    except UserError:  # a folder without weights
        return None


def dims_dict(dims) -> dict:
    """ModelDimensions (or a dict of them) as a plain dict."""
    return dict(dims) if isinstance(dims, dict) else asdict(dims)
