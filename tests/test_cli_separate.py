"""`uss separate` end to end on small real models (random weights) and real files."""

import json

import numpy as np
import pytest
import soundfile
import torch

from jobs.cli import main
from tests.tiny_models import tiny_checkpoint
from uss_core.ontology import LabelSet, load_label_set

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def audioset_checkpoint(tmp_path_factory, audioset_dir):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", load_label_set(audioset_dir))


@pytest.fixture
def wav(tmp_path):
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(44100 * 5)).astype(np.float32)
    stereo = np.stack([audio, audio[::-1]], axis=1)
    path = tmp_path / "in put.wav"
    soundfile.write(path, stereo, 44100)  # stereo 44.1 kHz: resampled and downmixed
    return path


def _run(*args):
    return main(["separate", *map(str, args), "--quiet", "--device", "cpu"])


def test_class_queries_one_stem_each_and_union(audioset_checkpoint, audioset_dir, wav, tmp_path):
    out = tmp_path / "out"
    code = _run(wav, "-o", out, "--checkpoint", audioset_checkpoint, "--metadata-dir", audioset_dir,
                "--class", "speech", "--class", "Violin, fiddle", "--class-id", "0+137", "--activity-threshold", "0")
    assert code == 0
    folder = out / "in put"
    manifest = json.loads((folder / "manifest.json").read_text())
    names = [s["name"] for s in manifest["stems"]]
    assert names == ["Speech", "Violin, fiddle", "Speech + Music"]
    for stem in manifest["stems"]:
        audio, rate = soundfile.read(folder / stem["file"])
        assert rate == 32000 and len(audio) == 5 * 32000
        assert stem["active_segments"] == manifest["separation"]["segments"]
    assert manifest["stems"][2]["class_mids"] == ["/m/09x0r", "/m/04rlf"]
    assert (folder / "activity.png").stat().st_size > 0
    assert manifest["duration_seconds"] == pytest.approx(5.0)


def test_hierarchical_default_levels_write_level_folders(audioset_checkpoint, audioset_dir, wav, tmp_path):
    out = tmp_path / "out"
    assert _run(wav, "-o", out, "--checkpoint", audioset_checkpoint, "--metadata-dir", audioset_dir,
                "--levels", "1", "--activity-threshold", "0", "--format", "flac") == 0
    manifest = json.loads((out / "in put" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stems"]][:3] == ["Human sounds", "Animal", "Music"]
    assert len(manifest["stems"]) == 7
    files = sorted(p.name for p in (out / "in put" / "level1").iterdir())
    assert "Channel, environment and background.flac" in files and len(files) == 7


def test_inactive_hierarchy_nodes_get_no_file(audioset_checkpoint, audioset_dir, wav, tmp_path):
    out = tmp_path / "out"
    assert _run(wav, "-o", out, "--checkpoint", audioset_checkpoint, "--metadata-dir", audioset_dir,
                "--levels", "1", "--activity-threshold", "1.01") == 0
    manifest = json.loads((out / "in put" / "manifest.json").read_text())
    assert all(s["file"] is None and s["active_segments"] == 0 for s in manifest["stems"])
    assert not (out / "in put" / "level1").exists() or not any((out / "in put" / "level1").iterdir())


def test_query_by_example(tmp_path, wav):
    labels = LabelSet(mids=("/m/a", "/m/b"), names=("A", "B"))
    ckpt = tiny_checkpoint(tmp_path / "emb", labels, condition_type="embedding")
    examples = tmp_path / "examples"
    examples.mkdir()
    soundfile.write(examples / "one.wav", 0.5 * np.sin(np.arange(32000) / 5), 32000)
    soundfile.write(examples / "two.flac", 0.5 * np.sin(np.arange(48000) / 7), 32000)
    out = tmp_path / "out"
    assert _run(wav, "-o", out, "--checkpoint", ckpt, "--query-audio", examples) == 0
    assert (out / "in put" / "query-examples.wav").exists()
    # An embedding model cannot answer class queries: a clear error, exit status 2.
    assert _run(wav, "-o", out, "--checkpoint", ckpt, "--class", "A") == 2


def test_user_errors_exit_2_with_a_message(audioset_checkpoint, audioset_dir, wav, tmp_path, capsys):
    base = ["-o", tmp_path / "out", "--checkpoint", audioset_checkpoint, "--metadata-dir", audioset_dir]
    assert _run(wav, *base, "--class", "Pianoo") == 2
    assert "did you mean" in capsys.readouterr().err
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    assert _run(bad, *base, "--class", "Piano") == 2
    assert "bad.wav" in capsys.readouterr().err
    assert _run(wav, *base, "--class", "Piano", "--levels", "1") == 2
    assert _run(tmp_path / "missing.wav", *base) == 2
    assert not list((tmp_path / "out").rglob("*.wav"))  # nothing half-written


def test_same_input_names_get_distinct_folders(audioset_checkpoint, audioset_dir, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        soundfile.write(tmp_path / sub / "x.wav", np.zeros(16000, np.float32), 32000)
    out = tmp_path / "out"
    assert _run(tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav", "-o", out, "--checkpoint",
                audioset_checkpoint, "--metadata-dir", audioset_dir, "--class", "Speech") == 0
    assert sorted(p.name for p in out.iterdir()) == ["x", "x-2"]
