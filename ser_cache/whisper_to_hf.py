"""An openai-whisper checkpoint as a transformers WhisperModel folder, the same weights renamed.

Both layouts are public: openai-whisper's `Whisper` (whisper/model.py) and transformers'
`WhisperModel` (models/whisper/modeling_whisper.py). Per block the names map as

    openai-whisper                      transformers
    attn.query / key / value / out      self_attn.q_proj / k_proj / v_proj / out_proj
    attn_ln                             self_attn_layer_norm
    cross_attn.* , cross_attn_ln        encoder_attn.* , encoder_attn_layer_norm  (decoder)
    mlp.0 , mlp.2 , mlp_ln              fc1 , fc2 , final_layer_norm

and outside the blocks

    encoder.positional_embedding        encoder.embed_positions.weight
    encoder.ln_post                     encoder.layer_norm
    decoder.token_embedding             decoder.embed_tokens
    decoder.positional_embedding        decoder.embed_positions.weight
    decoder.ln                          decoder.layer_norm

Tensors keep their dtype (a released checkpoint's float16); every one must find its place and
every place must be filled, or the conversion is refused. Used to check the transformers path
against the openai-whisper one on the same weights (tests/test_e2e_hf_whisper.py, bench).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .encoder import read_checkpoint
from .hf_encoders import EncoderError

BLOCK_PARTS = {  # openai-whisper name inside a block -> transformers name inside a layer
    "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj", "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj", "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1", "mlp.2": "fc2", "mlp_ln": "final_layer_norm",
}
OUTSIDE_BLOCKS = {
    "encoder.positional_embedding": "encoder.embed_positions.weight",
    "decoder.positional_embedding": "decoder.embed_positions.weight",
    "decoder.token_embedding.weight": "decoder.embed_tokens.weight",
    "encoder.ln_post.weight": "encoder.layer_norm.weight", "encoder.ln_post.bias": "encoder.layer_norm.bias",
    "decoder.ln.weight": "decoder.layer_norm.weight", "decoder.ln.bias": "decoder.layer_norm.bias",
}
BLOCK_KEY = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


def hf_name(key: str) -> str:
    """The transformers WhisperModel name of an openai-whisper state-dict key."""
    if key in OUTSIDE_BLOCKS:
        return OUTSIDE_BLOCKS[key]
    m = BLOCK_KEY.match(key)
    if m and m.group(3) in BLOCK_PARTS:
        side, i, part, kind = m.groups()
        return f"{side}.layers.{i}.{BLOCK_PARTS[part]}.{kind}"
    if key.startswith(("encoder.conv1.", "encoder.conv2.")):
        return key
    raise EncoderError(f"no transformers name for the openai-whisper weight {key!r}: is this a Whisper checkpoint?")


def whisper_config(dims: dict):
    """transformers' WhisperConfig of an openai-whisper ModelDimensions dict. The decoder's
    special token ids are transformers' defaults, kept inside the vocabulary of a test model
    that has fewer tokens; the encoder never reads them."""
    from transformers import WhisperConfig

    if dims["n_text_state"] != dims["n_audio_state"]:
        raise EncoderError(f"dims {dims}: transformers' Whisper has one width for encoder and decoder")
    last = dims["n_vocab"] - 1
    defaults = WhisperConfig()
    tokens = {k: min(getattr(defaults, k), last) for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                           "decoder_start_token_id")}
    return WhisperConfig(
        vocab_size=dims["n_vocab"], num_mel_bins=dims["n_mels"], d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"], encoder_attention_heads=dims["n_audio_head"],
        decoder_layers=dims["n_text_layer"], decoder_attention_heads=dims["n_text_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"], decoder_ffn_dim=4 * dims["n_text_state"],
        max_source_positions=dims["n_audio_ctx"], max_target_positions=dims["n_text_ctx"],
        activation_function="gelu", **tokens)  # openai-whisper's nn.GELU: the exact (erf) GELU


def convert_whisper(checkpoint: Path, out: Path) -> Path:
    """Write the openai-whisper checkpoint file `checkpoint` as a transformers WhisperModel
    folder `out` (config.json, model.safetensors). Returns `out`."""
    import transformers
    from transformers import WhisperModel

    transformers.utils.logging.disable_progress_bar()  # its bar per file saved says nothing here
    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = read_checkpoint(checkpoint.read_bytes(), str(checkpoint))
    weights = {hf_name(k): v for k, v in ckpt["model_state_dict"].items()}
    config = whisper_config(ckpt["dims"])
    with torch.device("meta"):  # no random initialisation: every tensor comes from the checkpoint
        model = WhisperModel(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise EncoderError(f"{checkpoint}: {len(missing)} transformers weights not in it (e.g. {missing[:2]}), "
                           f"{len(unexpected)} of its weights with no place (e.g. {unexpected[:2]})")
    model.save_pretrained(out, safe_serialization=True)
    return out
