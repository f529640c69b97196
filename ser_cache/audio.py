"""Audio files -> 16 kHz mono float32, the only input Whisper takes.

Any format and rate that libsndfile reads (WAV, FLAC, OGG, ...) is accepted; channels are
averaged and the rate converted with soxr (a band-limited resampler: naive decimation would
fold high frequencies back into the speech band). Utterances longer than Whisper's 30 s window
are never cut silently: `LONG_AUDIO_POLICIES` says what may happen to them.

A path may also name an example of a Hugging Face dataset ("hf:LOCATION?split=...": see
hfexamples.py), whose encoded audio is decoded from the dataset the same way.

Every problem with a file raises `AudioError` whose `reason` is a short sentence that ends up
in the cache's table of skipped utterances.
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
import struct

import numpy as np
import soundfile as sf
import soxr

from .errors import UserError
from .hfexamples import DATASET_REF_PREFIX, row_audio, row_has_audio
from .records import RecordsError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # Hz, what Whisper was trained on
WINDOW_SECONDS = 30  # Whisper's fixed input window
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480000 samples in a 30-second window
SAMPLES_PER_FRAME = 320  # 2 mel hops of 160 samples: one encoder frame every 20 ms

# What to do with an utterance longer than one window:
#   refuse:   skip it, with a reason that names the other policies (default)
#   truncate: keep the first 30 s only (recorded as a note in the cache)
#   windows:  encode consecutive 30 s windows and join their frames (nothing lost)
LONG_AUDIO_POLICIES = ("refuse", "truncate", "windows")

# Data sizes that streaming WAV writers leave in the header when they cannot seek back to fill
# it in: not a promise of that many bytes, so not a sign of truncation.
WAV_SIZE_PLACEHOLDERS = (0, 0xFFFFFFFF)


class AudioError(UserError):
    """A file that cannot become Whisper input; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def audio_duration(path) -> float:
    """Seconds, from the file header; 0.0 when the header cannot be read.

    A bad file is not an error here: the extractor skips it later, with its reason, and the
    summary of `corpora.prepare` counts the files whose header could not be read.
    """
    try:
        return float(sf.info(str(path)).duration)
    except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
        log.warning("cannot read the header of %s (%s); duration set to 0.0", path, e)
        return 0.0


def audio_exists(path: str) -> bool:
    """Whether there is audio at `path`: a file, or a dataset example holding audio."""
    if str(path).startswith(DATASET_REF_PREFIX):
        return row_has_audio(path)
    return os.path.exists(path)


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """Read a file, or a dataset example, as it is: (samples, channels) float32 and its sample
    rate in Hz.

    Raises AudioError for missing, unreadable, truncated or non-audio files.
    """
    if str(path).startswith(DATASET_REF_PREFIX):
        return read_example_audio(path)
    if not os.path.exists(path):
        raise AudioError("file not found")
    if os.path.isdir(path):
        raise AudioError("is a folder, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise AudioError("permission denied: make the file readable")
    cut = wav_truncation(path)
    if cut:
        raise AudioError(cut)
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"not a readable audio file ({_first_line(e)})") from e
    except OSError as e:
        raise AudioError(f"cannot read: {e.strerror or e}") from e
    return data, rate


def read_example_audio(ref: str) -> tuple[np.ndarray, int]:
    """One dataset example's audio as it is: (samples, channels) float32 and its own rate in Hz.

    Raises AudioError for a reference that names no example, an example holding no audio, or
    audio soundfile cannot decode.
    """
    try:
        value = row_audio(ref)
    except RecordsError as e:
        raise AudioError(str(e)) from None
    data, path = value.get("bytes"), value.get("path")
    if not data:
        if path and os.path.isfile(path):  # a parquet written without embedding the files
            return read_audio(path)
        raise AudioError(f"the example holds no audio (no bytes{f', and no file {path}' if path else ''})")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"not readable audio ({_first_line(e)}); soundfile decodes WAV, FLAC and OGG") from e
    return samples, rate


def wav_truncation(path: str) -> str:
    """Why a WAV file's data is shorter than its header says (a cut copy), or "".

    libsndfile reads such a file without complaint and returns the samples that are there, so
    a half-copied utterance would pass for a shorter one. Non-WAV files give "" (their decoders
    report damage themselves: a cut FLAC fails to decode).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return ""
            pos, byte_rate = 12, 0
            while pos + 8 <= size:
                f.seek(pos)
                chunk, n = struct.unpack("<4sI", f.read(8))
                if chunk == b"fmt " and n >= 12:
                    fmt = f.read(12)
                    byte_rate = struct.unpack("<I", fmt[8:12])[0] if len(fmt) == 12 else 0
                if chunk == b"data":
                    present = size - pos - 8
                    if n in WAV_SIZE_PLACEHOLDERS or present >= n:
                        return ""
                    if byte_rate:
                        said, held = f"{n / byte_rate:.2f} s", f"{present / byte_rate:.2f} s"
                    else:
                        said, held = f"{n} bytes", f"{present} bytes"
                    return (f"truncated: the header declares {said} of audio, the file holds {held} "
                            "(an incomplete copy?): copy the file again")
                pos += 8 + n + (n & 1)  # chunks are padded to an even size
    except OSError:
        return ""  # let the decoder say what is wrong
    return ""


def to_whisper_input(data: np.ndarray, rate: int) -> np.ndarray:
    """Mix to mono and resample to 16 kHz.

    data: (samples, channels) float32 at `rate` Hz. Returns (samples_16k,) float32.
    Raises AudioError for empty audio, NaN or infinite samples, or audio shorter than one
    encoder frame (20 ms).
    """
    if data.shape[0] == 0:
        raise AudioError("no samples (zero-length audio)")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(f"{bad} NaN or infinite samples: the file is damaged")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    if len(mono) < SAMPLES_PER_FRAME:
        ms = 1000 * len(mono) / SAMPLE_RATE
        raise AudioError(f"too short: {ms:.1f} ms, shorter than one 20 ms encoder frame")
    return np.ascontiguousarray(mono, dtype=np.float32)


def apply_long_policy(audio: np.ndarray, policy: str) -> tuple[list[np.ndarray], str]:
    """Split 16 kHz audio into the windows the encoder will see.

    Returns (windows, note): one window for audio of at most 30 s; for longer audio, what
    `policy` says (see LONG_AUDIO_POLICIES), and a note for the cache ("" when nothing
    happened). Raises AudioError under the "refuse" policy.
    """
    if policy not in LONG_AUDIO_POLICIES:
        raise ValueError(f"unknown long-audio policy {policy!r}; choose one of {LONG_AUDIO_POLICIES}")
    if len(audio) <= WINDOW_SAMPLES:
        return [audio], ""
    seconds = len(audio) / SAMPLE_RATE
    if policy == "refuse":
        raise AudioError(
            f"longer than {WINDOW_SECONDS} s ({seconds:.1f} s): pass --long-audio windows to keep "
            f"all of it, or --long-audio truncate to keep the first {WINDOW_SECONDS} s"
        )
    if policy == "truncate":
        return [audio[:WINDOW_SAMPLES]], f"truncated from {seconds:.1f} s to {WINDOW_SECONDS} s"
    n = math.ceil(len(audio) / WINDOW_SAMPLES)
    # A last window of a few samples is fine: it is zero-padded to whole frames like any other.
    windows = [audio[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES] for i in range(n)]
    return windows, f"{seconds:.1f} s encoded as {len(windows)} windows of up to {WINDOW_SECONDS} s"


def load_utterance(path: str, long_policy: str = "refuse", transform=None) -> tuple[list[np.ndarray], list[str]]:
    """Read one utterance as Whisper windows: ([(samples,) float32 at 16 kHz, ...], notes).

    Notes are things worth knowing that do not stop the file from being used (digital
    silence, truncation). Raises AudioError for anything that does. transform: a function of
    the 16 kHz audio applied before it is split into windows (an augmented view, augment.py).
    """
    data, rate = read_audio(path)
    audio = to_whisper_input(data, rate)
    if transform is not None:
        audio = to_whisper_input(transform(audio)[:, None], SAMPLE_RATE)  # the same checks on the view
    notes = []
    if not np.any(audio):
        notes.append("digital silence (every sample is zero)")
    windows, note = apply_long_policy(audio, long_policy)
    if note:
        notes.append(note)
    return windows, notes


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    if not text:
        return type(e).__name__
    # libsndfile starts with "Error opening '<path>': ": the path is recorded beside the reason
    return re.sub(r"^Error opening '.*': ", "", text.splitlines()[0])
