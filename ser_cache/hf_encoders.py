"""Speech encoders from transformers: Whisper, WavLM, HuBERT, wav2vec2 and data2vec-audio.

Where a model comes from (`load_hf_encoder`):

    a local folder      config.json and the weights in save_pretrained's layout
                        (model.safetensors, or model-0000K-of-0000N.safetensors plus its index;
                        pytorch_model.bin only where no safetensors file is there), and
                        preprocessor_config.json where the model has one
    a hub id            e.g. microsoft/wavlm-large, fetched into transformers' own cache
                        (~/.cache/huggingface/hub, or HF_HOME); offline, only what is cached
    a short name        wavlm-large, hubert-large, ... (SHORT_NAMES): the hub id it stands for

The family is read from config.json's model_type; anything else is refused. Weights never run
code when loaded: safetensors where present, a pickled .bin only with weights_only. The model's
fingerprint is the SHA-256 over its config, preprocessor config and weight files (`folder_sha256`).

State numbering is transformers' `hidden_states` for every family: state 0 is the input to the
first block, state i the output of block i, and the last state the encoder's last_hidden_state:
after the final LayerNorm where the model has one there (Whisper, and wav2vec2-style models with
do_stable_layer_norm, the large ones; transformers 4 gives this as hidden_states[-1], transformers
5 gives the block's output before that LayerNorm there). For wav2vec2-style models state 0 is the
feature projection plus the convolutional positional embedding, through the encoder's LayerNorm
where the model applies it there (do_stable_layer_norm false, the base models).
n_blocks + 1 states in all.

What each family encodes:

    whisper      the log-mel of encoder.log_mel, in the modes padded, trim and short exactly as
                 the openai-whisper path (encode_whisper runs transformers' modules)
    waveform     (wavlm, hubert, wav2vec2, data2vec-audio) the 16 kHz speech itself, zero mean
                 and unit variance per window where the model's preprocessor says do_normalize;
                 one frame per 320 samples (20 ms) from a 400-sample receptive field, both read
                 from the config's convolutions. Their mode is recorded as `short`: only the
                 speech is encoded.

Batching never changes a state: models whose convolutional front end normalises per frame
(feat_extract_norm "layer") get an attention mask, and the padded frames are zeroed as
transformers does; the others (feat_extract_norm "group", the wav2vec2-base style, whose
GroupNorm takes its statistics over the whole padded input, and data2vec-audio, whose stacked
positional convolutions carry the padding into the speech: `masked`) are run on groups of
windows of equal length, without padding.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .audio import SAMPLE_RATE
from .errors import UserError

# config.json's model_type -> the transformers class that holds its encoder
FAMILIES = {"whisper": "WhisperModel", "wavlm": "WavLMModel", "hubert": "HubertModel",
            "wav2vec2": "Wav2Vec2Model", "data2vec-audio": "Data2VecAudioModel"}
WAVEFORM_FAMILIES = ("wavlm", "hubert", "wav2vec2", "data2vec-audio")
STACKED_POSITION_CONVS = ("data2vec-audio",)  # batches of equal lengths only (`masked`)
# The names EmoBox and nkululeko use, and a few more, for the hub ids they stand for.
SHORT_NAMES = {
    "wavlm-base": "microsoft/wavlm-base", "wavlm-base-plus": "microsoft/wavlm-base-plus",
    "wavlm-large": "microsoft/wavlm-large",
    "hubert-base": "facebook/hubert-base-ls960", "hubert-large": "facebook/hubert-large-ll60k",
    "hubert-large-ll60k": "facebook/hubert-large-ll60k", "hubert-xlarge": "facebook/hubert-xlarge-ll60k",
    "wav2vec2-base": "facebook/wav2vec2-base", "wav2vec2-large": "facebook/wav2vec2-large-lv60",
    "wav2vec2-large-xlsr-53": "facebook/wav2vec2-large-xlsr-53",
    "data2vec-audio-base": "facebook/data2vec-audio-base", "data2vec-audio-large": "facebook/data2vec-audio-large",
    "data2vec-base": "facebook/data2vec-audio-base", "data2vec-large": "facebook/data2vec-audio-large",
    "whisper-large-v3": "openai/whisper-large-v3", "whisper-large-v3-turbo": "openai/whisper-large-v3-turbo",
    "whisper-medium": "openai/whisper-medium", "whisper-small": "openai/whisper-small",
    "whisper-base": "openai/whisper-base", "distil-large-v3": "distil-whisper/distil-large-v3",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
# The weight files transformers reads, by save_pretrained's names (one file, or shards and
# their index); other files of a repository (openai/whisper-large-v3's model.fp32-*.safetensors)
# are neither fetched nor part of the fingerprint.
SAFETENSORS = ("model.safetensors", "model-*-of-*.safetensors")
PICKLED = ("pytorch_model.bin", "pytorch_model-*-of-*.bin")
SAFETENSORS_INDEX, PICKLED_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
LAYOUT = "a folder holding config.json and model.safetensors (save_pretrained's layout), or a hub id such as microsoft/wavlm-large"
# wav2vec2-style preprocessors normalise by default (transformers' Wav2Vec2FeatureExtractor)
DEFAULT_DO_NORMALIZE = True
NORM_EPS = 1e-7  # added to the variance before the square root, as the models were trained
# Keys a Wav2Vec2Model-style checkpoint may lack without changing any state: the embedding
# that replaces masked frames in pre-training only.
UNUSED_AT_INFERENCE = ("masked_spec_embed",)


class EncoderError(UserError, ValueError):
    """A model that cannot be loaded as asked; the message names it and the fix."""


# --- finding the files ------------------------------------------------------------------------


def is_hf_source(name_or_path: str) -> bool:
    """True for what load_hf_encoder takes: an existing folder, a short name or a hub id."""
    return Path(name_or_path).expanduser().is_dir() or name_or_path in SHORT_NAMES or bool(HUB_ID.match(name_or_path))


def resolve(name_or_path: str) -> tuple[Path, str]:
    """(folder, name): a local folder as it is (named by its last part); a short name or hub
    id through transformers' cache (downloaded there on a machine with network), named by
    its hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.absolute(), path.name
    repo = SHORT_NAMES.get(name_or_path, name_or_path)
    return hub_folder(repo), repo


def hub_folder(repo: str) -> Path:
    """The snapshot folder of hub model `repo` in transformers' cache, with its config and
    weights (safetensors, else the pickled .bin); fetched when the hub can be reached."""
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(repo, allow_patterns=[CONFIG, PREPROCESSOR, *SAFETENSORS, SAFETENSORS_INDEX]))
        if not _matching(folder, SAFETENSORS):  # an older repository: pickled weights only
            folder = Path(snapshot_download(repo, allow_patterns=[CONFIG, PREPROCESSOR, *PICKLED, PICKLED_INDEX]))
    except Exception as e:  # offline miss, unknown or gated repository, network: all said in one line
        why = _first_line(e)
        raise EncoderError(
            f"{repo} is neither a local folder nor a model in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"({why}): on a machine with network run `hf download {repo}` (it fills that cache; copy it here, or "
            f"set HF_HOME to a copy), or pass --model {LAYOUT}") from None
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers will read: the safetensors files, else the pickled ones."""
    files = _matching(folder, SAFETENSORS) or _matching(folder, PICKLED)
    if not files:
        raise EncoderError(f"{folder} has no weights (model.safetensors or pytorch_model.bin): pass {LAYOUT}")
    return files


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(pattern)})


def folder_sha256(folder: Path) -> str:
    """SHA-256 over the config, the preprocessor config (where present) and the weight files,
    each as its name and its bytes, in name order: the model's fingerprint."""
    folder = Path(folder)
    files = [folder / CONFIG] + ([folder / PREPROCESSOR] if (folder / PREPROCESSOR).is_file() else []) + weight_files(folder)
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def read_config(folder: Path) -> dict:
    """config.json as a dict, its family checked; EncoderError in one line otherwise."""
    path = folder / CONFIG
    if not path.is_file():
        raise EncoderError(f"{folder} has no {CONFIG}: pass {LAYOUT}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EncoderError(f"{path} cannot be read ({_first_line(e)}): save the model again with save_pretrained") from None
    family = config.get("model_type") if isinstance(config, dict) else None
    if family not in FAMILIES:
        raise EncoderError(f"{folder} holds a {family!r} model; supported families: {', '.join(sorted(FAMILIES))}")
    return config


def read_preprocessor(folder: Path) -> dict:
    """preprocessor_config.json as a dict ({} where the folder has none)."""
    path = folder / PREPROCESSOR
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EncoderError(f"{path} cannot be read ({_first_line(e)}): save the feature extractor again") from None


# --- loading ----------------------------------------------------------------------------------


def load_hf_encoder(name_or_path: str, device: str | torch.device = "cpu"):
    """A transformers speech encoder, in float32, in eval mode: the fields of an
    encoder.LoadedEncoder (which encoder.load_encoder makes of them), as a dict.

    encoder: the WhisperEncoder of a Whisper model, the whole model of the other families.
    dims use the cache's names: n_audio_state the width of a state, n_audio_layer the blocks;
    Whisper adds n_mels, n_audio_ctx and n_audio_head (as openai-whisper's dims), the waveform
    families the input they read (waveform_dims). path: the folder read (for a hub id, its
    snapshot in transformers' cache).
    """
    folder, name = resolve(name_or_path)
    config = read_config(folder)
    family = config["model_type"]
    sha = folder_sha256(folder)
    model = _from_pretrained(folder, family)
    cfg = model.config
    if family == "whisper":
        encoder = model.encoder  # the decoder is never run; it goes with `model` on return
        dims = {"n_mels": cfg.num_mel_bins, "n_audio_ctx": cfg.max_source_positions, "n_audio_state": cfg.d_model,
                "n_audio_head": cfg.encoder_attention_heads, "n_audio_layer": cfg.encoder_layers}
    else:
        encoder = model
        dims = {"n_audio_state": cfg.hidden_size, "n_audio_layer": cfg.num_hidden_layers,
                "n_audio_head": cfg.num_attention_heads, **waveform_dims(cfg, read_preprocessor(folder), folder)}
    encoder.to(device).eval()
    return dict(encoder=encoder, name=name, sha256=sha, dims=dims, path=str(folder), family=family)


def _from_pretrained(folder: Path, family: str):
    """The family's transformers model from `folder`, refusing weights that do not fit it."""
    import transformers

    cls = getattr(transformers, FAMILIES[family])
    transformers.utils.logging.disable_progress_bar()  # a bar per load would bury extract's own lines
    safetensors = bool(_matching(folder, SAFETENSORS))
    try:
        model, info = cls.from_pretrained(folder, dtype=torch.float32, use_safetensors=safetensors, weights_only=True,
                                          local_files_only=True, output_loading_info=True)
    except Exception as e:  # damaged file, wrong shapes, unreadable: transformers says which
        raise EncoderError(f"{folder} cannot be loaded as a {family} model ({_first_line(e)}): pass {LAYOUT}") from None
    # transformers initialises missing weights at random and only warns: refused here, since
    # states of random weights would be cached as if they were the model's
    used = (lambda k: k.startswith("encoder.")) if family == "whisper" else (lambda k: not k.startswith(UNUSED_AT_INFERENCE))
    missing = [k for k in info.get("missing_keys", []) if used(k)]
    if missing or info.get("mismatched_keys"):
        listed = ", ".join(sorted(missing)[:3]) or str(info["mismatched_keys"][:2])
        raise EncoderError(f"{folder}: its weights do not fit its {CONFIG} ({len(missing)} missing, e.g. {listed}): "
                           f"pass {LAYOUT}")
    return model


def waveform_dims(cfg, preprocessor: dict, folder: Path) -> dict:
    """What a waveform encoder's input is: the frame hop and receptive field in samples (from
    the convolutions), whether each window is normalised, the front end's normalisation."""
    rate = preprocessor.get("sampling_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise EncoderError(f"{folder} expects {rate} Hz audio; this tool reads {SAMPLE_RATE} Hz: pass a 16 kHz model")
    kernels, strides = list(cfg.conv_kernel), list(cfg.conv_stride)
    receptive = 1
    for k, s in zip(reversed(kernels), reversed(strides)):
        receptive = (receptive - 1) * s + k
    return {"hop_samples": math.prod(strides), "receptive_samples": receptive,
            "do_normalize": bool(preprocessor.get("do_normalize", DEFAULT_DO_NORMALIZE)),
            "feat_extract_norm": getattr(cfg, "feat_extract_norm", "layer"),  # data2vec-audio: always layer
            "conv_kernel": kernels, "conv_stride": strides}


# --- input -----------------------------------------------------------------------------------


def waveform_frames(n_samples: int, dims: dict) -> int:
    """Frames the convolutions make of n_samples (0 when shorter than the receptive field)."""
    n = n_samples
    for k, s in zip(dims["conv_kernel"], dims["conv_stride"]):
        n = (n - k) // s + 1 if n >= k else 0
    return n


def waveform_input(audio: np.ndarray, dims: dict) -> torch.Tensor:
    """One window of 16 kHz audio (samples,) as the model reads it: (samples,) float32, zero
    mean and unit variance over the window where the model's preprocessor does that."""
    x = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    if dims["do_normalize"]:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + NORM_EPS)
    return x


# --- encoding ---------------------------------------------------------------------------------


@torch.inference_mode()
def encode_whisper(encoder, mel: torch.Tensor, n_frames: torch.Tensor | None, keep: list[int]) -> dict[int, torch.Tensor]:
    """transformers' WhisperEncoder run as encoder.encode runs openai-whisper's: same
    arguments, same states, same modes (the short mode slices the positional embedding,
    which WhisperEncoder.forward refuses, so its modules are driven here).

    mel: (B, n_mels, 2T); n_frames: (B,) valid frames, or None when every column is input.
    Returns {state: (B, T, dim)}; blocks after the last kept state are not run.
    """
    from transformers.masking_utils import create_bidirectional_mask

    n_blocks = len(encoder.layers)
    assert keep and all(0 <= s <= n_blocks for s in keep), f"states {keep} outside 0..{n_blocks}"
    t = mel.shape[-1] // 2
    x = F.gelu(encoder.conv1(mel))
    key_mask = None
    if n_frames is not None:
        key_mask = torch.arange(t, device=mel.device)[None, :] < n_frames[:, None]  # (B, T)
        # as encoder.encode: conv2 of a batch neighbour's padding must see zeros, as alone
        mel_mask = torch.arange(2 * t, device=mel.device)[None, :] < 2 * n_frames[:, None]
        x = x * mel_mask[:, None, :].to(x.dtype)
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[:t]
    mask = None if key_mask is None else create_bidirectional_mask(encoder.config, x, key_mask.long())
    states = {0: x} if 0 in keep else {}
    for i, layer in enumerate(encoder.layers[: max(keep)], start=1):
        x = layer(x, mask)
        x = x[0] if isinstance(x, tuple) else x  # transformers before 5 returned a tuple
        if i in keep and i < n_blocks:
            states[i] = x
    if n_blocks in keep:
        states[n_blocks] = encoder.layer_norm(x)
    return states


def masked(family: str, dims: dict) -> bool:
    """Whether a batch of this model may be padded and masked without changing its states:
    a front end that normalises per frame (LayerNorm), and one convolution for the positional
    embedding, which sees the padded frames zeroed as an utterance alone sees zero padding.
    data2vec-audio stacks several such convolutions, and from the second on the padding is
    no longer zero (measured: states 2.0 apart at the end of a batched utterance)."""
    return dims["feat_extract_norm"] == "layer" and family not in STACKED_POSITION_CONVS


@torch.inference_mode()
def encode_waveform(model, family: str, dims: dict, waves: list[torch.Tensor], keep: list[int]) -> dict[int, torch.Tensor]:
    """Run a waveform encoder over windows of speech and return the states listed in `keep`.

    waves: B windows, each (samples_b,) as waveform_input makes them.
    Returns {state: (B, T, dim)}, T the most frames of any window, zeros past each window's
    waveform_frames. A masked model (`masked`) runs the batch at once with an attention mask;
    the others run each group of equal-length windows without padding.
    """
    device = next(model.parameters()).device
    if masked(family, dims) or len({len(w) for w in waves}) == 1:
        groups = [list(range(len(waves)))]
    else:
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            by_length.setdefault(len(w), []).append(i)
        groups = list(by_length.values())
    frames = [waveform_frames(len(w), dims) for w in waves]
    out: dict[int, torch.Tensor] = {}
    for group in groups:
        width = max(len(waves[i]) for i in group)
        x = torch.zeros(len(group), width, device=device)
        for row, i in enumerate(group):
            x[row, : len(waves[i])] = waves[i].to(device)
        lengths = torch.tensor([len(waves[i]) for i in group], device=device)
        sample_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long() if len(group) > 1 else None
        states = run_hidden_states(model, x, sample_mask, keep)
        for s, h in states.items():
            if s not in out:
                out[s] = torch.zeros(len(waves), max(frames), h.shape[-1], dtype=h.dtype, device=h.device)
            for row, i in enumerate(group):
                out[s][i, : frames[i]] = h[row, : frames[i]]
    return out


class _Enough(Exception):
    """Raised by a hook once the highest state asked for is computed: the rest is not run."""


def run_hidden_states(model, x: torch.Tensor, sample_mask: torch.Tensor | None, keep: list[int]) -> dict[int, torch.Tensor]:
    """The model's hidden_states listed in `keep`, taken by hooks as transformers records them
    (state 0: the first block's input; i: block i's output; the last: the encoder's output),
    stopping the forward after the block of the highest one.

    x: (B, samples); sample_mask: (B, samples) 1 = speech, or None. Returns {state: (B, T, dim)}.
    """
    blocks = model.encoder.layers
    n_blocks, top = len(blocks), max(keep)
    assert keep and all(0 <= s <= n_blocks for s in keep), f"states {keep} outside 0..{n_blocks}"
    states: dict[int, torch.Tensor] = {}

    def keep_state(i: int, h) -> None:
        h = h[0] if isinstance(h, tuple) else getattr(h, "last_hidden_state", h)
        if i in keep:
            states[i] = h
        if i == top:
            raise _Enough

    hooks = [blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: keep_state(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
    hooks += [blocks[i - 1].register_forward_hook(lambda m, a, out, i=i: keep_state(i, out))
              for i in range(1, min(top, n_blocks - 1) + 1)]
    hooks.append(model.encoder.register_forward_hook(lambda m, a, out: keep_state(n_blocks, out)))
    try:
        with _removed(hooks):
            model(x, attention_mask=sample_mask)
    except _Enough:
        pass
    assert set(states) == set(keep), f"hooks kept states {sorted(states)}, asked for {keep}"
    return states


@contextmanager
def _removed(hooks):
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
