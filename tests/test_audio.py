"""Audio files -> Whisper input: every kind of bad file becomes an AudioError with a reason.

Each case is a small synthetic file written in tmp_path; the CLI-level behaviour (skipped,
recorded, counted) is in test_faults.py.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import soundfile as sf

from ser_cache import audio
from ser_cache.audio import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    WINDOW_SAMPLES,
    AudioError,
    apply_long_policy,
    load_utterance,
)

from conftest import tone


def write(path, data, rate=SAMPLE_RATE, subtype=None):
    sf.write(path, data, rate, subtype=subtype)
    return str(path)


def reason(path, policy="refuse") -> str:
    with pytest.raises(AudioError) as e:
        load_utterance(str(path), policy)
    assert str(e.value) == e.value.reason
    return e.value.reason


def peak_hz(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


# --- files that cannot be used -----------------------------------------------------------------


def test_missing_file_and_folder(tmp_path):
    assert reason(tmp_path / "nowhere.wav") == "file not found"
    (tmp_path / "dir.wav").mkdir()
    assert "is a folder" in reason(tmp_path / "dir.wav")


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    assert reason(tmp_path / "empty.wav") == "empty file (0 bytes)"


@pytest.mark.parametrize("content", [b"hello, I am a text file\n" * 20, np.random.default_rng(0).bytes(4000)],
                         ids=["text", "random-bytes"])
def test_not_audio(tmp_path, content):
    (tmp_path / "take: 2.wav").write_bytes(content)
    why = reason(tmp_path / "take: 2.wav")
    assert why.startswith("not a readable audio file (")
    assert "take: 2" not in why  # the path is recorded beside the reason, not inside it


def test_riff_header_then_garbage(tmp_path):
    raw = open(write(tmp_path / "good.wav", tone(0.5)), "rb").read()
    (tmp_path / "bad.wav").write_bytes(raw[:12] + np.random.default_rng(1).bytes(3000))
    assert reason(tmp_path / "bad.wav").startswith("not a readable audio file")


def test_truncated_header(tmp_path):
    raw = open(write(tmp_path / "good.wav", tone(0.5), subtype="PCM_16"), "rb").read()
    (tmp_path / "cut20.wav").write_bytes(raw[:20])  # inside the fmt chunk
    assert reason(tmp_path / "cut20.wav").startswith("not a readable audio file")
    (tmp_path / "cut44.wav").write_bytes(raw[:44])  # header whole, not one sample of data
    assert reason(tmp_path / "cut44.wav").startswith("truncated")


@pytest.mark.parametrize("keep", [0.5, 0.03])
def test_truncated_data_is_refused_not_shortened(tmp_path, keep):
    """libsndfile reads what is there; a cut copy must not pass for a shorter utterance."""
    raw = open(write(tmp_path / "good.wav", tone(1.0), subtype="PCM_16"), "rb").read()
    data_bytes = len(raw) - 44
    (tmp_path / "cut.wav").write_bytes(raw[: 44 + int(keep * data_bytes) + 1])  # odd: half a sample
    why = reason(tmp_path / "cut.wav")
    assert why.startswith("truncated") and "1.00 s" in why and "copy the file again" in why


def test_truncated_flac(tmp_path):
    noise = tone(2.0) + 0.05 * np.random.default_rng(0).standard_normal((32000, 1)).astype(np.float32)
    raw = open(write(tmp_path / "good.flac", noise), "rb").read()
    (tmp_path / "cut.flac").write_bytes(raw[: len(raw) // 2])
    assert reason(tmp_path / "cut.flac").startswith("not a readable audio file")


def test_wav_with_placeholder_sizes_is_read(tmp_path):
    """Streamed WAVs carry 0 or 0xFFFFFFFF as their data size: that is not truncation."""
    raw = bytearray(open(write(tmp_path / "good.wav", tone(0.5), subtype="PCM_16"), "rb").read())
    assert raw[36:40] == b"data"
    raw[40:44] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "stream.wav").write_bytes(bytes(raw))
    windows, _ = load_utterance(str(tmp_path / "stream.wav"))
    assert len(windows[0]) == 8000


def test_zero_samples(tmp_path):
    write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32))
    assert reason(tmp_path / "zero.wav") == "no samples (zero-length audio)"


@pytest.mark.parametrize("rate,n,ok", [(16000, 100, False), (16000, 319, False), (16000, 320, True),
                                       (8000, 150, False), (48000, 900, False), (48000, 960, True)])
def test_shorter_than_one_encoder_frame(tmp_path, rate, n, ok):
    path = write(tmp_path / "short.wav", tone(1.0, rate=rate)[:n], rate, subtype="FLOAT")
    if ok:
        windows, _ = load_utterance(path)
        assert len(windows[0]) >= SAMPLES_PER_FRAME
    else:
        assert "shorter than one 20 ms encoder frame" in reason(path)


@pytest.mark.parametrize("bad,subtype", [(np.nan, "FLOAT"), (np.inf, "DOUBLE"), (-np.inf, "FLOAT")])
def test_nan_and_infinite_samples(tmp_path, bad, subtype):
    x = tone(0.5)
    x[[10, 400]] = bad
    path = write(tmp_path / "bad.wav", x, subtype=subtype)
    assert reason(path) == "2 NaN or infinite samples: the file is damaged"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root, which reads a chmod 000 file anyway; "
                           "test_unreadable_file_simulated covers the same branch")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "locked.wav", tone(0.5))
    os.chmod(path, 0)
    try:
        assert reason(path) == "permission denied: make the file readable"
    finally:
        os.chmod(path, 0o644)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    path = write(tmp_path / "locked.wav", tone(0.5))
    real = os.access
    monkeypatch.setattr(audio.os, "access", lambda p, mode, **kw: False if str(p) == path else real(p, mode, **kw))
    assert reason(path) == "permission denied: make the file readable"


def test_read_error_midway_simulated(tmp_path, monkeypatch):
    """An I/O error of the disk (or a network share going away) is a skip, not a crash."""
    path = write(tmp_path / "x.wav", tone(0.5))

    def fail(*a, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audio.sf, "read", fail)
    assert reason(path) == "cannot read: Input/output error"


# --- files that are used -----------------------------------------------------------------------


def test_digital_silence_is_kept_with_a_note(tmp_path):
    path = write(tmp_path / "silence.wav", np.zeros((8000, 1), np.float32))
    windows, notes = load_utterance(path)
    assert len(windows) == 1 and len(windows[0]) == 8000 and not windows[0].any()
    assert notes == ["digital silence (every sample is zero)"]


@pytest.mark.parametrize("channels", range(1, 9))
def test_channels_are_averaged(tmp_path, channels):
    x = tone(0.5, channels=channels) * np.linspace(1.0, 0.2, channels, dtype=np.float32)
    path = write(tmp_path / "multi.wav", x, subtype="FLOAT")
    assert sf.info(path).channels == channels
    windows, notes = load_utterance(path)
    assert notes == [] and windows[0].dtype == np.float32 and windows[0].ndim == 1
    np.testing.assert_allclose(windows[0], x.mean(axis=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000])
def test_any_rate_becomes_16k_without_aliasing(tmp_path, rate):
    seconds = 0.5
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t)
    if rate > 2 * 12000:  # 12 kHz is above 16 kHz's Nyquist: it must be removed, not folded to 4 kHz
        x = x + 0.3 * np.sin(2 * np.pi * 12000 * t)
    path = write(tmp_path / f"r{rate}.wav", x.astype(np.float32), rate, subtype="FLOAT")
    (y,), _ = load_utterance(path)
    assert abs(len(y) - seconds * SAMPLE_RATE) <= 1
    assert abs(peak_hz(y) - 440) < 5
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / SAMPLE_RATE)
    near_4k = spectrum[(freqs > 3800) & (freqs < 4200)].max()
    assert near_4k < 1e-3 * spectrum.max()


def test_paths_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "dossier à espaces" / "Ünïcødé 音声"
    folder.mkdir(parents=True)
    path = write(folder / "émotion fâchée ñ.wav", tone(0.5))
    (y,), notes = load_utterance(path)
    assert len(y) == 8000 and notes == []


# --- longer than Whisper's 30 s window ---------------------------------------------------------


def test_long_audio_policies(tmp_path):
    path = write(tmp_path / "long.wav", tone(31.0, freq=200))
    assert "--long-audio windows" in reason(path, "refuse") and "31.0 s" in reason(path, "refuse")

    (w,), notes = load_utterance(path, "truncate")
    assert len(w) == WINDOW_SAMPLES and notes == ["truncated from 31.0 s to 30 s"]

    windows, notes = load_utterance(path, "windows")
    assert [len(w) for w in windows] == [WINDOW_SAMPLES, 16000]
    assert notes == ["31.0 s encoded as 2 windows of up to 30 s"]
    full, _ = audio.read_audio(path)
    np.testing.assert_array_equal(np.concatenate(windows), full[:, 0])  # nothing lost


@pytest.mark.parametrize("policy", ["refuse", "truncate", "windows"])
def test_exactly_30_s_is_one_window_under_every_policy(policy):
    windows, note = apply_long_policy(np.ones(WINDOW_SAMPLES, np.float32), policy)
    assert len(windows) == 1 and note == ""


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="refuse.*truncate.*windows"):
        apply_long_policy(np.ones(10, np.float32), "split")
