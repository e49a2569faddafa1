"""Audio decoding, validation, streaming, writing and the small signal helpers."""

import numpy as np
import pytest
import soundfile as sf
import soxr

from uss_core.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioFileWriter,
    fix_length,
    load_audio,
    open_audio_stream,
    remove_silence,
    repeat_to_length,
    resample,
    write_audio,
)
from uss_core.errors import AudioError, ConfigError


def noise(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """``(frames, channels)`` float32 noise at -10 dBFS-ish."""
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)


def expected_mono(frames: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """The specification of load_audio: average channels, then soxr HQ to the target rate."""
    mono = frames.mean(axis=1).astype(np.float32)
    return mono if rate == target else soxr.resample(mono, rate, target, quality="HQ")


def write_wav(path, frames, rate, subtype="FLOAT"):
    sf.write(path, frames, rate, subtype=subtype)
    return path


@pytest.mark.parametrize(
    "rate, channels, seconds",
    [(32000, 1, 0.5), (44100, 2, 0.5), (8000, 8, 0.1), (48000, 1, 0.37), (22050, 3, 0.25)],
)
def test_load_audio_mixes_to_mono_and_resamples(tmp_path, rate, channels, seconds):
    frames = noise(seconds, rate, channels)
    path = write_wav(tmp_path / "in.wav", frames, rate)
    audio = load_audio(path)
    expected = expected_mono(frames, rate)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape == expected.shape
    np.testing.assert_allclose(audio, expected, atol=1e-5)
    with open_audio_stream(path) as stream:
        assert stream.num_samples == len(audio)
        assert stream.channels == channels and stream.source_sample_rate == rate
        assert stream.duration_seconds == pytest.approx(len(frames) / rate)


def test_load_audio_accepts_bytes_and_file_objects(tmp_path):
    frames = noise(0.2, 16000, 2)
    path = write_wav(tmp_path / "in.wav", frames, 16000)
    from_path = load_audio(path)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), from_path)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), from_path)
    np.testing.assert_array_equal(load_audio(str(path), 16000), frames.mean(axis=1))


@pytest.mark.parametrize(
    "suffix, fmt, subtype, atol",
    [
        (".flac", "FLAC", "PCM_24", 1e-5),
        (".aiff", "AIFF", "PCM_16", 1e-4),
        (".ogg", "OGG", "VORBIS", None),
        (".mp3", "MP3", "MPEG_LAYER_III", None),
    ],
)
def test_load_audio_decodes_common_formats(tmp_path, suffix, fmt, subtype, atol):
    assert suffix in AUDIO_EXTENSIONS
    rate = 16000
    t = np.arange(rate // 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / f"tone{suffix}"
    sf.write(path, tone, rate, format=fmt, subtype=subtype)
    audio = load_audio(path, rate)
    if atol is not None:
        np.testing.assert_allclose(audio, tone, atol=atol)
    else:  # lossy codecs: same length (within codec padding), same tone
        assert abs(len(audio) - len(tone)) < rate // 10
        n = min(len(audio), len(tone))
        assert np.corrcoef(audio[:n], tone[:n])[0, 1] > 0.9


def test_stream_blocks_equal_one_shot(tmp_path):
    frames = noise(1.3, 44100, 2)
    path = write_wav(tmp_path / "in.wav", frames, 44100)
    whole = load_audio(path)
    for block in (1, 777, 32000, 10**6):
        with open_audio_stream(path) as stream:
            parts = []
            while len(part := stream.read(block)):
                assert len(part) <= block
                parts.append(part)
            assert len(stream.read(block)) == 0
        streamed = np.concatenate(parts)
        assert len(streamed) == stream.num_samples == len(whole)
        np.testing.assert_allclose(streamed, whole, atol=1e-4)
    np.testing.assert_allclose(whole, expected_mono(frames, 44100), atol=1e-4)


def test_stream_lengths_match_soxr_for_many_sizes(tmp_path):
    for rate in (8000, 11025, 44100, 48000, 96000):
        for frames in (1, 7, 100, 4097):
            if frames * SAMPLE_RATE / rate < 0.5:
                continue
            path = write_wav(tmp_path / f"{rate}-{frames}.wav", noise(frames / rate, rate), rate)
            with open_audio_stream(path) as stream:
                expected = len(soxr.resample(np.zeros(frames, np.float32), rate, SAMPLE_RATE, quality="HQ"))
                assert stream.num_samples == expected
                assert len(stream.read(10**6)) == expected


def test_missing_and_undecodable_files_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError, match=r"bad\.wav: cannot decode audio .*supported formats: WAV, FLAC"):
        load_audio(bad)
    with pytest.raises(AudioError, match="s3://bucket/key.flac: cannot decode"):
        load_audio(b"\x00" * 100, name="s3://bucket/key.flac")


def test_empty_file_is_rejected(tmp_path):
    path = write_wav(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 32000)
    with pytest.raises(AudioError, match="empty.wav: the file holds no audio samples"):
        load_audio(path)


@pytest.mark.parametrize("rate", [500, 1_000_000])
def test_absurd_sample_rates_are_rejected(tmp_path, rate):
    path = write_wav(tmp_path / "odd.wav", np.zeros((rate // 10, 1), np.float32), rate)
    with pytest.raises(AudioError, match=f"odd.wav: sample rate {rate} Hz is outside 1000-768000 Hz"):
        load_audio(path)


def test_non_finite_samples_are_reported_with_their_time(tmp_path):
    frames = noise(3.0, 8000)
    frames[2 * 8000 + 4000, 0] = np.nan
    path = write_wav(tmp_path / "nan.wav", frames, 8000)
    with pytest.raises(AudioError, match=r"nan.wav: non-finite sample .* at 2\.500 s"):
        load_audio(path)
    frames[2 * 8000 + 4000, 0] = np.inf
    path = write_wav(tmp_path / "inf.wav", frames, 8000)
    with open_audio_stream(path, 8000) as stream:
        assert len(stream.read(8000)) == 8000  # the damage is only met when it is read
        with pytest.raises(AudioError, match=r"at 2\.500 s"):
            stream.read(3 * 8000)


def test_target_rate_is_checked(tmp_path):
    path = write_wav(tmp_path / "in.wav", noise(0.1, 8000), 8000)
    with pytest.raises(ConfigError, match="target sample rate"):
        load_audio(path, 10)


def test_write_audio_round_trips_and_is_atomic(tmp_path):
    audio = noise(0.25, 32000)[:, 0] * 5  # louder than full scale: float WAV keeps it
    wav = write_audio(tmp_path / "a" / "b" / "stem.wav", audio, 32000)
    read, rate = sf.read(wav, dtype="float32")
    assert rate == 32000 and sf.info(wav).subtype == "FLOAT"
    np.testing.assert_array_equal(read, audio)
    flac = write_audio(tmp_path / "stem.flac", audio / 10, 32000)
    assert sf.info(flac).subtype == "PCM_24"
    np.testing.assert_allclose(sf.read(flac, dtype="float32")[0], audio / 10, atol=1e-6)
    forced = write_audio(tmp_path / "stem.out", audio, 16000, format="flac")
    assert sf.info(forced).format == "FLAC"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["stem.flac", "stem.out", "stem.wav"]


def test_failed_write_leaves_the_old_file_and_no_temporaries(tmp_path):
    path = write_audio(tmp_path / "stem.wav", np.ones(10, np.float32) * 0.5, 32000)
    bad = np.zeros(100, np.float32)
    bad[50] = np.nan
    with pytest.raises(AudioError, match="stem.wav: refusing to write non-finite samples"):
        write_audio(path, bad, 32000)
    np.testing.assert_array_equal(sf.read(path, dtype="float32")[0], np.full(10, 0.5, np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["stem.wav"]
    with pytest.raises(ConfigError, match=r"stem.mp4: cannot tell the output audio format"):
        write_audio(tmp_path / "stem.mp4", np.zeros(10), 32000)


def test_audio_file_writer_streams_commits_and_discards(tmp_path):
    blocks = [noise(0.1, 32000, seed=i)[:, 0] for i in range(3)]
    writer = AudioFileWriter(tmp_path / "out" / "x.wav", 32000)
    for block in blocks:
        writer.write(block)
    assert not (tmp_path / "out" / "x.wav").exists()  # nothing under the final name until commit
    assert writer.commit() == tmp_path / "out" / "x.wav"
    np.testing.assert_array_equal(sf.read(tmp_path / "out" / "x.wav", dtype="float32")[0], np.concatenate(blocks))
    dropped = AudioFileWriter(tmp_path / "out" / "y.flac", 32000)
    dropped.write(blocks[0])
    assert dropped.discard() is None
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.wav"]


def test_resample():
    x = noise(0.5, 48000)[:, 0]
    y = resample(x, 48000, 32000)
    assert y.dtype == np.float32 and len(y) == 16000
    np.testing.assert_array_equal(resample(x, 48000, 48000), x)


def reference_remove_silence(audio, sample_rate):
    """uss/utils.py remove_silence, with librosa's framing."""
    librosa = pytest.importorskip("librosa")
    window = int(sample_rate * 0.1)
    frames = librosa.util.frame(x=audio, frame_length=window, hop_length=window).T
    return frames[np.max(np.abs(frames), axis=-1) > 0.02].flatten()


def test_remove_silence_matches_reference():
    rate = 1000
    audio = np.zeros(1050, np.float32)  # ten 100-sample frames and a 50-sample tail
    audio[120] = 0.5  # frame 1 is active
    audio[430] = -0.03  # frame 4 is active (|x| above the threshold)
    audio[650] = 0.02  # frame 6 is not (not strictly above)
    audio[1020] = 1.0  # the partial tail frame is dropped
    kept = remove_silence(audio, rate)
    np.testing.assert_array_equal(kept, np.concatenate([audio[100:200], audio[400:500]]))
    rng = np.random.default_rng(1)
    for _ in range(5):
        audio = (rng.standard_normal(rng.integers(3200, 20000)) * rng.uniform(0.001, 0.03)).astype(np.float32)
        np.testing.assert_array_equal(remove_silence(audio, 32000), reference_remove_silence(audio, 32000))
    assert remove_silence(np.ones(50, np.float32), 1000).shape == (0,)


def test_repeat_to_length_and_fix_length():
    audio = np.arange(1, 4, dtype=np.float32)
    for n in (0, 2, 3, 7, 9):
        np.testing.assert_array_equal(repeat_to_length(audio, n), np.tile(audio, n // 3 + 1)[0:n])
    np.testing.assert_array_equal(repeat_to_length(np.stack([audio, -audio]), 5)[1], -np.array([1, 2, 3, 1, 2]))
    np.testing.assert_array_equal(fix_length(audio, 5), [1, 2, 3, 0, 0])
    np.testing.assert_array_equal(fix_length(audio, 2), [1, 2])
    librosa = pytest.importorskip("librosa")
    batch = np.ones((2, 4))
    for n in (1, 4, 6):
        np.testing.assert_array_equal(fix_length(batch, n), librosa.util.fix_length(batch, size=n))
