"""The encoder states we capture are exactly openai-whisper's, in every mode; a file that is not a
Whisper checkpoint is one clear error, and a crafted one never runs its code."""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from click.testing import CliRunner

from ser_cache.audio import SAMPLES_PER_FRAME
from ser_cache.cache import open_cache
from ser_cache.cli import main
from ser_cache.encoder import CheckpointError, encode, load_encoder, log_mel, speech_frames
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


# --- files that are not Whisper checkpoints: one clear error, no code run ---------------------


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Payload:
    """What a crafted checkpoint carries: unpickling it calls open(marker, "w"), creating a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# case -> (bytes from the good checkpoint's bytes and contents, what the message must say)
BAD_CHECKPOINTS = {
    "random bytes": (lambda raw, ckpt: np.random.default_rng(0).bytes(4000), r"it is damaged, or holds pickled objects"),
    "truncated": (lambda raw, ckpt: raw[: len(raw) // 2], r"cannot be read as a torch file: .*truncated, or not a checkpoint"),
    "no dims": (lambda raw, ckpt: _torch_bytes({"model_state_dict": ckpt["model_state_dict"]}),
                r"it holds a dict with keys \['model_state_dict'\]"),
    "not a dict": (lambda raw, ckpt: _torch_bytes([1, 2, 3]), r"it holds a list"),
    "dims missing keys": (lambda raw, ckpt: _torch_bytes({**ckpt, "dims": {k: v for k, v in ckpt["dims"].items() if k != "n_audio_layer"}}),
                          r"its dims lack positive integers \['n_audio_layer'\]"),
    "weights do not fit": (lambda raw, ckpt: _torch_bytes({**ckpt, "dims": {**ckpt["dims"], "n_audio_state": 64}}),
                           r"its encoder weights do not fit its dims \{.*'n_audio_state': 64.*\}: size mismatch for"),
}
EXPECTED = "expected a Whisper checkpoint: a torch file holding a dict with 'dims' and 'model_state_dict'"


@pytest.fixture(scope="module")
def csv_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt-corpus")
    records = write_corpus(folder, n_speakers=3, per_speaker=3)  # every label from 3 speakers
    lines = ["path,label,speaker"] + [f"{Path(r.path).name},{r.label},{r.speaker}" for r in records]
    (folder / "utterances.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def extract_cli(corpus: Path, checkpoint: Path, out: Path):
    return CliRunner().invoke(main, ["extract", str(corpus), "--corpus", "csv", "--model", str(checkpoint),
                                     "--out", str(out), "--device", "cpu"], catch_exceptions=False)


def assert_one_line_refusal(result, path: Path, why: str):
    """The command failed with one `Error:` line naming the file and the reason, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.output.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"Error: {path} is not a Whisper checkpoint ("), result.output
    assert re.search(why, last) and EXPECTED in last, last


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_a_file_that_is_not_a_whisper_checkpoint_is_one_clear_error(tiny_checkpoint, csv_corpus, tmp_path, case):
    make, why = BAD_CHECKPOINTS[case]
    raw = tiny_checkpoint.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(make(raw, torch.load(io.BytesIO(raw), weights_only=True)))
    with pytest.raises(CheckpointError) as caught:
        load_encoder(str(bad))
    message = str(caught.value)
    assert message.startswith(f"{bad} is not a Whisper checkpoint (") and "\n" not in message
    assert re.search(why, message) and EXPECTED in message, message
    assert_one_line_refusal(extract_cli(csv_corpus, bad, tmp_path / "cache"), bad, why)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_a_crafted_checkpoint_is_refused_without_running_its_code(csv_corpus, tmp_path, container):
    marker = tmp_path / "payload-ran"
    crafted = {"dims": _Payload(marker), "model_state_dict": {}}
    bad = tmp_path / "crafted.pt"
    bad.write_bytes(_torch_bytes(crafted) if container == "torch.save" else pickle.dumps(crafted))
    # The payload is live: the old weights_only=False loading (or pickle itself) would run it.
    torch.load(bad, weights_only=False) if container == "torch.save" else pickle.loads(bad.read_bytes())
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match="could run code"):
        load_encoder(str(bad))
    assert not marker.exists()
    result = extract_cli(csv_corpus, bad, tmp_path / "cache")
    assert_one_line_refusal(result, bad, "pickled objects other than tensors and plain values, refused because loading them could run code")
    assert not marker.exists()


def test_a_real_style_checkpoint_loads_with_weights_only(tiny_checkpoint):
    """The fixture is saved as openai-whisper saves its releases: dims dict plus tensors."""
    enc = load_encoder(str(tiny_checkpoint))
    assert enc.path == str(tiny_checkpoint.absolute()) and enc.n_states == 3
