"""Audio input and output: decoding, validation, resampling, streaming and atomic writing.

Everything is mono float32 at the model rate (:data:`SAMPLE_RATE`) unless a function says
otherwise. Decoding is libsndfile (through ``soundfile``); resampling is soxr. A file is read
through :class:`AudioStream`, which decodes block by block, so an hour-long recording never has
to sit in memory; :func:`load_audio` is the same stream read to the end.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf
import soxr

from uss_core.errors import AudioError, ConfigError
from uss_core.files import temporary_sibling

SAMPLE_RATE = 32000
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000
RESAMPLE_QUALITY = "HQ"

# File name extensions of the formats libsndfile decodes that audio files commonly use.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64"}
)
SUPPORTED_FORMATS = "WAV, FLAC, Ogg (Vorbis, Opus), MP3, AIFF, AU, CAF, W64"

# Output formats: float WAV keeps separated stems bit-exact; FLAC is 24-bit (soundfile clips to
# [-1, 1] on the way, so stems louder than full scale lose their peaks).
_OUTPUT_FORMATS = {"wav": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_24")}

# Upper bound of input frames decoded in one step (8 channels x 2^20 frames x 4 bytes = 32 MiB).
_MAX_DECODE_FRAMES = 1 << 20
_MIN_DECODE_FRAMES = 4096

AudioSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]


def _check_rate(sample_rate: int, what: str) -> None:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ConfigError(
            f"{what} {sample_rate} Hz is outside the supported range {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )


def _source_name(source: AudioSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return "<audio bytes>"
    return str(getattr(source, "name", "<audio stream>"))


class AudioStream:
    """An open audio file read as consecutive blocks of mono float32 at ``sample_rate``.

    Channels are averaged to mono, then resampled with a streaming soxr resampler, so the
    concatenated blocks equal :func:`resample` of the whole file. Use as a context manager (or
    call :meth:`close`).

    Attributes:
        name: how the file is named in error messages.
        sample_rate: output sample rate (Hz).
        source_sample_rate: the file's own sample rate (Hz).
        channels: the file's channel count.
        source_frames: the file's length in frames at its own rate, as libsndfile reports it.
        num_samples: output length, ``round(source_frames * sample_rate / source_sample_rate)``
            (what soxr produces). Exact for PCM and FLAC; for MP3 and Ogg it rests on the
            decoder's frame count, and :meth:`read` returns what actually decodes.
    """

    def __init__(self, source: AudioSource, sample_rate: int = SAMPLE_RATE, *, name: str | None = None) -> None:
        _check_rate(sample_rate, "target sample rate")
        self.name = name if name is not None else _source_name(source)
        self.sample_rate = sample_rate
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
            raise AudioError(f"{self.name}: audio file not found; check the path")
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        try:
            self._file = sf.SoundFile(source)
        except sf.LibsndfileError as exc:
            raise AudioError(
                f"{self.name}: cannot decode audio ({exc.error_string}); supported formats: "
                f"{SUPPORTED_FORMATS}; convert the file to one of them (e.g. with ffmpeg)"
            ) from None
        try:
            self._validate_header()
        except AudioError:
            self._file.close()
            raise
        self.source_sample_rate: int = self._file.samplerate
        self.channels: int = self._file.channels
        self.source_frames: int = self._file.frames
        # Integer form of round-half-up, which is how soxr sizes its output.
        rate_in, rate_out = self.source_sample_rate, sample_rate
        self.num_samples: int = (2 * self.source_frames * rate_out + rate_in) // (2 * rate_in)
        if self.num_samples == 0:
            self._file.close()
            raise AudioError(
                f"{self.name}: {self.source_frames} frame(s) at {rate_in} Hz is shorter than one sample at "
                f"{rate_out} Hz; give a longer recording"
            )
        self._resampler = (
            soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality=RESAMPLE_QUALITY)
            if rate_in != rate_out
            else None
        )
        self._frames_decoded = 0
        self._finished = False
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0

    def _validate_header(self) -> None:
        rate = self._file.samplerate
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise AudioError(
                f"{self.name}: sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz; "
                "the file header is probably corrupt, re-export the file"
            )
        if self._file.frames <= 0:
            raise AudioError(f"{self.name}: the file holds no audio samples (zero length)")

    @property
    def duration_seconds(self) -> float:
        """Length of the file in seconds."""
        return self.source_frames / self.source_sample_rate

    def _decode_step(self, wanted_output: int) -> None:
        """Decode about enough input for ``wanted_output`` more output samples into the queue."""
        frames = -(-wanted_output * self.source_sample_rate // self.sample_rate)
        frames = min(max(frames, _MIN_DECODE_FRAMES), _MAX_DECODE_FRAMES)
        try:
            block = self._file.read(frames, dtype="float32", always_2d=True)
        except sf.LibsndfileError as exc:
            at = self._frames_decoded / self.source_sample_rate
            raise AudioError(
                f"{self.name}: decoding failed near {at:.3f} s ({exc.error_string}); the file is damaged, re-export it"
            ) from None
        mono = block.mean(axis=1) if self.channels > 1 else block[:, 0]
        if not np.isfinite(mono).all():
            at = (self._frames_decoded + int(np.argmin(np.isfinite(mono)))) / self.source_sample_rate
            raise AudioError(
                f"{self.name}: non-finite sample (NaN or infinity) at {at:.3f} s; the file is corrupt, "
                "re-export or repair it"
            )
        self._frames_decoded += len(mono)
        self._finished = len(mono) < frames
        if self._finished and self._frames_decoded == 0:
            raise AudioError(f"{self.name}: the file holds no audio samples (zero length)")
        out = mono if self._resampler is None else self._resampler.resample_chunk(mono, last=self._finished)
        if len(out):
            self._pending.append(out)
            self._pending_samples += len(out)

    def read(self, num_samples: int) -> np.ndarray:
        """The next ``num_samples`` output samples ``(num_samples,)`` float32; shorter at the end of
        the file, empty once it is exhausted. Raises AudioError on damaged or non-finite data."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        while self._pending_samples < num_samples and not self._finished:
            self._decode_step(num_samples - self._pending_samples)
        queued = np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=np.float32)
        out, rest = queued[:num_samples], queued[num_samples:]
        self._pending = [rest] if len(rest) else []
        self._pending_samples = len(rest)
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_audio_stream(source: AudioSource, sample_rate: int = SAMPLE_RATE, *, name: str | None = None) -> AudioStream:
    """Open ``source`` (a path, ``bytes``, or a binary file object) for block-wise reading.

    ``name`` is how error messages call the file (default: the path). Raises AudioError if the
    file is missing, undecodable, empty, or has an implausible sample rate.
    """
    return AudioStream(source, sample_rate, name=name)


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE, *, name: str | None = None) -> np.ndarray:
    """Decode a whole file to mono float32 at ``sample_rate``: ``(samples,)``.

    Accepts what :func:`open_audio_stream` accepts and raises the same errors.
    """
    with open_audio_stream(source, sample_rate, name=name) as stream:
        blocks = [stream.read(stream.num_samples)]
        # Compressed formats may decode a little longer than their header said.
        while len(tail := stream.read(SAMPLE_RATE)):
            blocks.append(tail)
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _output_format(path: Path, format: str | None) -> tuple[str, str]:
    key = (format or path.suffix.lstrip(".")).lower()
    if key not in _OUTPUT_FORMATS:
        raise ConfigError(
            f"{path}: cannot tell the output audio format; name the file .wav or .flac or pass format='wav'|'flac'"
        )
    return _OUTPUT_FORMATS[key]


class AudioFileWriter:
    """Writes mono audio block by block to a temporary file beside ``path``.

    :meth:`commit` renames it to ``path``; :meth:`discard` deletes it; so ``path`` either holds
    a complete file or is untouched. As a context manager it commits on success and discards on
    error. WAV is written as 32-bit float, FLAC as 24-bit PCM; ``format`` overrides the extension.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, format: str | None = None) -> None:
        self.path = Path(path)
        container, subtype = _output_format(self.path, format)
        self._temp = temporary_sibling(self.path)
        self._file = sf.SoundFile(
            self._temp, "w", samplerate=sample_rate, channels=1, format=container, subtype=subtype
        )
        self.num_samples = 0

    def write(self, audio: np.ndarray) -> None:
        """Append ``audio`` ``(samples,)``. Raises AudioError on NaN or infinite samples."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono audio (samples,), got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise AudioError(f"{self.path}: refusing to write non-finite samples (NaN or infinity)")
        self._file.write(audio)
        self.num_samples += len(audio)

    def commit(self) -> Path:
        """Finish the file and move it to ``path``; returns ``path``."""
        self._file.close()
        os.replace(self._temp, self.path)
        return self.path

    def discard(self) -> None:
        """Abandon the file; ``path`` is left as it was."""
        self._file.close()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> AudioFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int, *, format: str | None = None) -> Path:
    """Write mono ``audio`` ``(samples,)`` atomically to ``path`` (folders are created).

    The format comes from the extension or ``format`` ('wav': 32-bit float, 'flac': 24-bit).
    """
    with AudioFileWriter(path, sample_rate, format) as writer:
        writer.write(audio)
    return writer.path


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample ``audio`` ``(samples,)`` from ``orig_sr`` to ``target_sr`` (soxr, HQ) -> float32."""
    _check_rate(orig_sr, "source sample rate")
    _check_rate(target_sr, "target sample rate")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio
    return soxr.resample(audio, orig_sr, target_sr, quality=RESAMPLE_QUALITY)


def remove_silence(
    audio: np.ndarray, sample_rate: int, threshold: float = 0.02, window_seconds: float = 0.1
) -> np.ndarray:
    """Keep the active frames of ``audio`` ``(samples,)``, concatenated: ``(kept_samples,)``.

    As the reference: non-overlapping frames of ``int(sample_rate * window_seconds)`` samples,
    a frame is kept when its peak ``|x|`` exceeds ``threshold``, and the trailing partial frame
    is dropped. Audio shorter than one frame gives an empty array (the reference raises).
    """
    audio = np.asarray(audio)
    window = int(sample_rate * window_seconds)
    if window < 1:
        raise ValueError(f"window of {window_seconds} s at {sample_rate} Hz is shorter than one sample")
    frames = audio[: len(audio) // window * window].reshape(-1, window)
    return frames[np.abs(frames).max(axis=1, initial=0) > threshold].reshape(-1)


def repeat_to_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Tile ``audio`` ``(..., samples)`` along time and cut it to ``(..., num_samples)`` (as the reference)."""
    audio = np.asarray(audio)
    if audio.shape[-1] == 0:
        raise ValueError("cannot repeat empty audio to a length")
    return np.tile(audio, num_samples // audio.shape[-1] + 1)[..., :num_samples]


def fix_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Zero-pad or cut ``audio`` ``(..., samples)`` at the end to ``(..., num_samples)``
    (as ``librosa.util.fix_length``)."""
    audio = np.asarray(audio)
    missing = num_samples - audio.shape[-1]
    if missing <= 0:
        return audio[..., :num_samples]
    return np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, missing)])
