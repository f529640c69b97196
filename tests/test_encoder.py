"""The encoder states we capture are exactly openai-whisper's, in every mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import whisper

from ser_cache.audio import SAMPLES_PER_FRAME
from ser_cache.encoder import encode, load_encoder, log_mel, speech_frames
from ser_cache.cache import open_cache
from ser_cache.extract import ExtractOptions, extract

from conftest import tone, write_corpus


@pytest.fixture(scope="module")
def enc(tiny_checkpoint):
    return load_encoder(str(tiny_checkpoint))


def whisper_states(model, mel):
    """Every state of openai-whisper's own encoder, caught with forward hooks."""
    caught = []
    hooks = [b.register_forward_hook(lambda m, i, o: caught.append(o)) for b in model.encoder.blocks]
    hooks.append(model.encoder.blocks[0].register_forward_pre_hook(lambda m, i: caught.insert(0, i[0])))
    try:
        last = model.encoder(mel)
    finally:
        for h in hooks:
            h.remove()
    return caught[:-1] + [last]  # state 0, blocks 1..n-1, then ln_post(block n)


def test_padded_states_equal_openai_whisper(enc, tiny_checkpoint):
    model = whisper.load_model(str(tiny_checkpoint), device="cpu")
    audio = [tone(s, seed=i)[:, 0] for i, s in enumerate((0.7, 2.3))]
    mel = torch.stack([log_mel(a, 80, "padded") for a in audio])
    ours = encode(enc.encoder, mel, None, list(range(enc.n_states)))
    theirs = whisper_states(model, mel)
    assert len(ours) == len(theirs) == enc.n_states
    for s in range(enc.n_states):
        assert ours[s].shape == (2, 1500, enc.dim)
        torch.testing.assert_close(ours[s], theirs[s], atol=1e-5, rtol=0)
    # The last state is what `model.encoder(mel)` returns.
    torch.testing.assert_close(ours[enc.n_states - 1], model.encoder(mel), atol=1e-5, rtol=0)


def test_stopping_early_gives_the_same_states(enc):
    mel = log_mel(tone(1.0)[:, 0], 80, "padded")[None]
    full = encode(enc.encoder, mel, None, list(range(enc.n_states)))
    early = encode(enc.encoder, mel, None, [1])
    assert set(early) == {1}
    torch.testing.assert_close(early[1], full[1], atol=0, rtol=0)


def test_short_mode_batched_equals_one_at_a_time(enc):
    audio = [tone(s, seed=i)[:, 0] for i, s in enumerate((0.31, 1.7, 0.9))]
    mels = [log_mel(a, 80, "short") for a in audio]
    frames = [speech_frames(len(a)) for a in audio]
    assert [m.shape[-1] for m in mels] == [2 * f for f in frames]
    batch = torch.zeros(3, 80, max(m.shape[-1] for m in mels))
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[-1]] = m
    together = encode(enc.encoder, batch, torch.tensor(frames), list(range(enc.n_states)))
    for i, m in enumerate(mels):
        alone = encode(enc.encoder, m[None], None, list(range(enc.n_states)))
        for s in range(enc.n_states):
            torch.testing.assert_close(together[s][i, : frames[i]], alone[s][0], atol=1e-4, rtol=1e-4)


def test_speech_frames_is_ceil_of_samples_over_320():
    assert speech_frames(1) == 1
    assert speech_frames(SAMPLES_PER_FRAME) == 1
    assert speech_frames(SAMPLES_PER_FRAME + 1) == 2
    assert speech_frames(16000) == 50


def test_trim_cache_equals_padded_cache_cut_to_speech(enc, tmp_path):
    records = write_corpus(tmp_path / "corpus", n_speakers=2, per_speaker=2)
    caches = {}
    for mode in ("padded", "trim"):
        extract(records, tmp_path / mode, "csv", enc, ExtractOptions(mode=mode, dtype="float32", progress=False))
        caches[mode] = open_cache(tmp_path / mode)
    padded_meta = caches["padded"].read_meta()
    for s in caches["trim"].layers:
        padded, trim = caches["padded"].read_layer(s), caches["trim"].read_layer(s)
        assert list(trim.ids) == list(padded.ids)
        assert (padded.n_frames == 1500).all()
        assert list(trim.n_frames) == list(padded_meta["speech_frames"])
        for i in range(len(trim)):
            np.testing.assert_array_equal(trim.utterance(i), padded.utterance(i)[: trim.n_frames[i]])


def test_short_cache_is_close_to_trim_but_not_equal(enc, tmp_path):
    """Short mode drops the padding from self-attention: states differ, lengths agree."""
    records = write_corpus(tmp_path / "corpus", n_speakers=2, per_speaker=2)
    for mode in ("trim", "short"):
        extract(records, tmp_path / mode, "csv", enc, ExtractOptions(mode=mode, dtype="float32", progress=False))
    trim, short = open_cache(tmp_path / "trim").read_layer(0), open_cache(tmp_path / "short").read_layer(0)
    assert list(trim.n_frames) == list(short.n_frames)
    last_t, last_s = (open_cache(tmp_path / m).read_layer(enc.n_states - 1).frames for m in ("trim", "short"))
    assert not np.allclose(last_t, last_s, atol=1e-3)
