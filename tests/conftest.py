"""Shared fixtures: a tiny randomly initialised Whisper of the real architecture, tiny corpora.

Real weights and real data are used only by tests marked `e2e` (see test_e2e.py).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ser_cache.records import Utterance

# No test touches the network: transformers models come from folders the tests write, and a
# hub id that is not cached fails as it would offline. Set before huggingface_hub reads it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Real architecture, toy sizes: 80 mels and 1500 positions as in every Whisper, width 32.
TINY_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
                 n_vocab=64, n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (tiny heads only wait at barriers on a second one),
    the caller's count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_per_job():
    """Sweep workers of a test module see one core, so each runs one torch thread (tiny heads
    run fastest that way: a second thread only waits at barriers)."""
    from ser_cache import sweeping

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweeping, "available_cores", lambda: 1)
        yield


def make_checkpoint(path: Path, dims: dict = TINY_DIMS, seed: int = 0) -> Path:
    """Write an openai-whisper checkpoint of random weights (same format as the released ones)."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**dims))
    torch.save({"dims": dims, "model_state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("whisper") / "tiny-random.pt")


def tone(seconds: float, rate: int = 16000, freq: float = 220.0, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A voiced-like test signal: a harmonic tone plus a little noise, (samples, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * math.pi * freq * h * t) / h for h in (1, 2, 3)) * 0.2
    x = x + 0.01 * rng.standard_normal(len(t))
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def write_corpus(folder: Path, n_speakers: int = 4, per_speaker: int = 3, labels=("angry", "happy", "sad"),
                 seconds: tuple[float, float] = (0.3, 1.2), seed: int = 0) -> list[Utterance]:
    """Tiny synthetic corpus of wav files; returns its records (durations from the files)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for s in range(n_speakers):
        for u in range(per_speaker):
            label = labels[(s + u) % len(labels)]
            dur = float(rng.uniform(*seconds))
            path = folder / f"spk{s}_{u}_{label}.wav"
            sf.write(path, tone(dur, freq=150 + 50 * labels.index(label), seed=s * 100 + u), 16000)
            records.append(Utterance(id=path.stem, path=str(path), label=label, speaker=f"spk{s}",
                                     duration=sf.info(path).duration, original_label=label))
    return records


# --- real weights and real data (tests marked e2e) -----------------------------------------

def _e2e_missing(what: str):
    """Skip when real assets are absent, unless CI asked for them (then it is a failure)."""
    if os.environ.get("SER_CACHE_REQUIRE_E2E") == "1":
        pytest.fail(f"end-to-end asset missing: {what} (SER_CACHE_REQUIRE_E2E=1)")
    pytest.skip(f"end-to-end asset missing: {what}; `make test` builds it when ../shared is there")


def real_checkpoint(name: str) -> Path:
    folder = Path(os.environ.get("SER_CACHE_WEIGHTS_DIR", Path.home() / ".cache" / "whisper-offline"))
    path = folder / f"{name}.pt"
    if not path.is_file():
        _e2e_missing(str(path))
    return path


@pytest.fixture(scope="session")
def ravdess_dir() -> Path:
    # resolve(): the tests link to actor folders, and a relative link target would dangle.
    path = Path(os.environ.get("SER_CACHE_RAVDESS", Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess")).resolve()
    if not (path / "Actor_01").is_dir():
        _e2e_missing(str(path))
    return path
