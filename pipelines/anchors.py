"""Anchor mining: clips dataset -> anchors dataset (one 2-s anchor per positive label per clip).

A Ray Data stage with an actor pool (:class:`AnchorMiner`): each actor loads a sound event
detector (SED, :class:`~uss_core.models.panns.Cnn14DecisionLevelMax`) and a condition tagger
(:class:`~uss_core.models.panns.Cnn14`) once, then per batch of clips (``pyarrow.Table`` with
``CLIP_SCHEMA`` rows) it

1. runs the SED on the clips: ``framewise_output (clips, frames, classes)``, 100 frames/s;
2. places one anchor per positive label of each clip (``mode``):

   - ``"max_area"`` (the paper's): the anchor with the largest area under that class's
     probability curve (:func:`max_area_anchor`, the reference's ``AnchorSegmentDetector``
     arithmetic exactly: box filter of ``segment_frames = int(anchor_seconds * fps + 1)`` frames
     over the replicate-padded curve, first argmax, centre clamped to
     ``[segment_frames // 2, clip_frames - segment_frames // 2]``, start/end at ``hop``-sample
     frames, so a 2-s anchor is ``[(c - 100) * 320, (c + 100) * 320)``);
     With ``other_label_penalty`` > 0 (not the reference's; default 0) the window's score is
     that area minus ``other_label_penalty`` times the summed area of the clip's *other* weak
     labels (:func:`contrast_scores`), so the anchor prefers stretches where the class sounds
     alone: a weakly labelled clip's loudest stretch of one class is often where another plays
     too, and the anchor is the separator's training target as it is;
   - ``"random"`` (the paper's baseline): start uniform over the whole clip,
     ``[0, clip_samples - anchor_samples]``, drawn from ``(seed, clip_id, class_mid)`` alone
     (:func:`random_anchor`), so a rerun places every anchor at the same position whatever the
     batching;

3. runs the condition tagger on each anchor's audio: ``condition_at_soft`` (its
   ``clipwise_output``, in the condition tagger's class order) and ``condition_embedding``
   (its penultimate layer) -- the query net's soft and latent conditions of the anchor.

Output rows follow :data:`~pipelines.schemas.ANCHOR_SCHEMA`; ``score`` is the mean SED
probability of the class over the anchor's frames. Every anchor has the length
``2 * (segment_frames // 2) * hop`` samples (64000 = 2 s at the defaults).

Class indexes: ``class_index`` and ``clip_label_indexes`` are the clips dataset's label indexes;
the SED's class column is found by mid (an own-format tagger carries its label set; a PANNs
``.pth`` uses the 527 AudioSet classes, ``audioset_labels``). A clip label that the SED does not
know is a :class:`~uss_core.errors.ConfigError` before any work starts.

Use::

    config = MiningConfig(sed_tagger="runs/tagger-sed", condition_tagger="runs/tagger-clip")
    result = mine_anchors("s3://bucket/clips", "s3://bucket/anchors", config, filesystem=fs)

CPUs: each actor reserves ``cpus_per_actor`` (fractional by default: on small machines an actor
pool that takes every CPU starves the Parquet read tasks and hangs) and runs torch with
``torch_threads`` threads.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F

from pipelines.model_store import has_scheme, local_checkpoint
from pipelines.schemas import (
    ANCHOR_MODES,
    ANCHOR_SCHEMA,
    CLIP_SCHEMA,
    count_rows,
    float_list_array,
    list_column_to_arrays,
    make_anchor_id,
    read_table,
    resolve_filesystem,
)
from uss_core.errors import CheckpointError, ConfigError
from uss_core.ontology import LabelSet

# --------------------------------------------------------------------------------------------
# Anchor placement: pure functions


@dataclass(frozen=True)
class AnchorGeometry:
    """Frame arithmetic of the reference's ``AnchorSegmentDetector`` for one clip length.

    ``frames_per_second``: SED frames per second (``sample_rate / hop_samples``, 100);
    ``clip_frames = int(clip_seconds * fps)`` (1000 for 10 s; the SED itself outputs one more
    frame, 1001); ``segment_frames = int(anchor_seconds * fps + 1)`` (201 for 2 s: the box
    filter's length, odd so it has a centre).
    """

    sample_rate: int
    hop_samples: int
    clip_samples: int
    anchor_seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_samples

    @property
    def clip_frames(self) -> int:
        return int(self.clip_samples / self.sample_rate * self.frames_per_second)

    @property
    def segment_frames(self) -> int:
        return int(self.anchor_seconds * self.frames_per_second + 1)

    @property
    def half_frames(self) -> int:
        return self.segment_frames // 2

    @property
    def anchor_frames(self) -> int:
        """Frames an anchor spans (200 for 2 s)."""
        return 2 * self.half_frames

    @property
    def anchor_samples(self) -> int:
        """Samples in every anchor (64000 for 2 s at 32 kHz)."""
        return self.anchor_frames * self.hop_samples

    def validate(self) -> None:
        if not self.anchor_seconds > 0:
            raise ConfigError(f"anchor_seconds must be > 0, got {self.anchor_seconds}")
        if self.anchor_frames < 2 or self.anchor_frames > self.clip_frames:
            raise ConfigError(
                f"a {self.anchor_seconds}-s anchor ({self.anchor_samples} samples) does not fit "
                f"{self.clip_samples}-sample clips at {self.sample_rate} Hz"
            )


def max_area_scores(prob: torch.Tensor, segment_frames: int) -> torch.Tensor:
    """Area under ``prob (frames,)`` of the ``segment_frames`` window centred on each frame.

    The reference's ``AnchorSegmentScorer``: replicate padding by ``segment_frames // 2`` on each
    side, then a box filter of ``segment_frames`` taps of ``1 / segment_frames``. Returns
    ``(frames,)``, float32.
    """
    half = segment_frames // 2
    x = F.pad(prob.to(torch.float32)[None, None, :], pad=(half, half), mode="replicate")
    weight = torch.ones(1, 1, segment_frames) / segment_frames
    return torch.conv1d(x, weight, padding=0)[0, 0]


def contrast_scores(prob: torch.Tensor, other_probs: torch.Tensor, segment_frames: int, penalty: float) -> torch.Tensor:
    """Max-area scores of ``prob (frames,)`` minus ``penalty`` times those of the other labels.

    ``other_probs``: ``(labels, frames)``, the SED curves of the clip's other positive labels
    (may be empty: then the plain :func:`max_area_scores`). The box filter is linear, so the
    others' areas are one filter over their summed curve.
    """
    scores = max_area_scores(prob, segment_frames)
    if penalty and len(other_probs):
        scores = scores - penalty * max_area_scores(other_probs.to(torch.float32).sum(dim=0), segment_frames)
    return scores


def max_area_anchor(
    prob: torch.Tensor | np.ndarray,
    geometry: AnchorGeometry,
    other_probs: torch.Tensor | np.ndarray | None = None,
    other_label_penalty: float = 0.0,
) -> tuple[int, int]:
    """``(start_sample, end_sample)`` of the max-area anchor of one class's SED curve.

    ``prob``: ``(frames,)`` frame-wise probabilities of the class (the SED's frames for the
    clip). The first argmax of :func:`max_area_scores`, clamped so the anchor lies in the first
    ``clip_frames`` frames, as the reference. With ``other_label_penalty`` > 0, the argmax of
    :func:`contrast_scores` against ``other_probs (labels, frames)``, the clip's other labels.
    """
    prob = torch.from_numpy(np.ascontiguousarray(prob)) if isinstance(prob, np.ndarray) else prob
    if other_probs is None or not other_label_penalty:
        scores = max_area_scores(prob, geometry.segment_frames)
    else:
        scores = contrast_scores(prob, torch.as_tensor(other_probs), geometry.segment_frames, other_label_penalty)
    half = geometry.half_frames
    centre = min(max(int(torch.argmax(scores)), half), geometry.clip_frames - half)
    return (centre - half) * geometry.hop_samples, (centre + half) * geometry.hop_samples


def _uniform_integer(key: str, high: int) -> int:
    """A uniform integer in ``[0, high]`` determined by ``key`` alone."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    entropy = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
    return int(np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy))).integers(0, high + 1))


def random_anchor(seed: int, clip_id: str, class_mid: str, geometry: AnchorGeometry) -> tuple[int, int]:
    """``(start_sample, end_sample)`` of a random anchor: start uniform in
    ``[0, clip_samples - anchor_samples]``, from ``(seed, clip_id, class_mid)`` alone.

    Not the reference's: it draws the centre frame from ``randint(0, segment_frames - 1)`` and
    then clamps it to ``>= segment_frames // 2``, so every "random" anchor starts within the
    first second of the clip (half of them exactly at 0). That is a bug we do not copy: the
    paper's random baseline means anchors anywhere in the clip.
    """
    high = geometry.clip_samples - geometry.anchor_samples
    start = _uniform_integer(f"{seed}\x00{clip_id}\x00{class_mid}", high)
    return start, start + geometry.anchor_samples


def anchor_score(prob: np.ndarray, start_sample: int, geometry: AnchorGeometry) -> float:
    """Mean of ``prob (frames,)`` over the anchor's frames ``[start // hop, + anchor_frames)``."""
    first = start_sample // geometry.hop_samples
    window = np.asarray(prob, dtype=np.float64)[first : first + geometry.anchor_frames]
    return float(window.mean()) if window.size else 0.0


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class MiningConfig:
    """How anchors are mined.

    ``sed_tagger`` / ``condition_tagger``: tagger checkpoints (own-format folder or PANNs
    ``.pth``; local paths or ``s3://``: remote ones are copied to a local temporary folder by
    each actor). One checkpoint may serve both (the SED and clip heads share the layout).
    ``audioset_labels``: the label set of a tagger checkpoint that carries none (PANNs ``.pth``:
    the 527 AudioSet classes); needed only then.
    ``batch_size``: clips per actor call; ``model_batch_size``: clips (SED) or anchors
    (condition tagger) per forward pass.
    """

    sed_tagger: str
    condition_tagger: str
    mode: str = "max_area"
    anchor_seconds: float = 2.0
    seed: int = 0
    batch_size: int = 8
    model_batch_size: int = 8
    actors: int = 2
    cpus_per_actor: float = 0.5
    torch_threads: int = 1
    audioset_labels: LabelSet | None = None
    other_label_penalty: float = 0.0  # max_area only; 0 is the reference's detector

    def __post_init__(self) -> None:
        if self.mode not in ANCHOR_MODES:
            raise ConfigError(f"anchor mode {self.mode!r} is not one of {', '.join(ANCHOR_MODES)}")
        if not self.anchor_seconds > 0:
            raise ConfigError(f"anchor_seconds must be > 0, got {self.anchor_seconds}")
        for name in ("batch_size", "model_batch_size", "actors", "torch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.cpus_per_actor > 0:
            raise ConfigError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if not self.other_label_penalty >= 0:
            raise ConfigError(f"other_label_penalty must be >= 0, got {self.other_label_penalty}")
        if self.other_label_penalty and self.mode != "max_area":
            raise ConfigError("other_label_penalty applies to max_area anchors only; drop it or use --mode max_area")


# --------------------------------------------------------------------------------------------
# Checkpoints on local disk, object storage or the MLflow registry


def load_tagger_from(uri: str, sound_event_detection: bool, audioset_labels: LabelSet | None, filesystem: Any = None):
    """``(model, labels)`` of a tagger checkpoint at ``uri`` (local or remote), in eval mode."""
    from uss_core.checkpoints import load_tagger

    path, tmp = local_checkpoint(uri, filesystem)
    try:
        model, labels = load_tagger(path, sound_event_detection=sound_event_detection)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if labels is None:
        if audioset_labels is None:
            raise ConfigError(
                f"{uri} carries no label set (a PANNs checkpoint): pass the AudioSet label list "
                "(--labels-csv, or the metadata folder)"
            )
        labels = audioset_labels
    if len(labels) != model.config.classes_num:
        raise CheckpointError(f"{uri}: {model.config.classes_num} classes but a label set of {len(labels)}")
    return model.eval(), labels


# --------------------------------------------------------------------------------------------
# The actor


class AnchorMiner:
    """Ray Data actor: a batch of clips (``CLIP_SCHEMA`` table) -> their anchors (``ANCHOR_SCHEMA``).

    Both taggers are loaded once, in ``__init__``; ``__call__`` runs under
    ``torch.inference_mode``. Also usable without Ray (``AnchorMiner(config)(table)``).
    """

    def __init__(self, config: MiningConfig, filesystem: Any = None) -> None:
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.sed, self.sed_labels = load_tagger_from(config.sed_tagger, True, config.audioset_labels, filesystem)
        self.tagger, self.tagger_labels = load_tagger_from(
            config.condition_tagger, False, config.audioset_labels, filesystem
        )
        self._sed_column = {mid: i for i, mid in enumerate(self.sed_labels.mids)}

    def geometry(self, clip_samples: int, sample_rate: int) -> AnchorGeometry:
        hop = self.sed.config.hop_size
        if sample_rate != self.sed.config.sample_rate:
            raise ConfigError(f"clips at {sample_rate} Hz, but the SED model takes {self.sed.config.sample_rate} Hz")
        geometry = AnchorGeometry(sample_rate, hop, clip_samples, self.config.anchor_seconds)
        geometry.validate()
        return geometry

    def _forward(self, model: torch.nn.Module, audio: np.ndarray, keys: tuple[str, ...]) -> list[np.ndarray]:
        """``model`` on ``audio (n, samples)`` in chunks of model_batch_size -> outputs ``keys``."""
        outputs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        step = self.config.model_batch_size
        for i in range(0, len(audio), step):
            out = model(torch.from_numpy(np.ascontiguousarray(audio[i : i + step])))
            for k in keys:
                outputs[k].append(out[k].numpy())
        return [np.concatenate(outputs[k]) for k in keys]

    def __call__(self, batch: pa.Table) -> pa.Table:
        with torch.inference_mode():
            return self._mine(batch)

    def _mine(self, batch: pa.Table) -> pa.Table:
        config = self.config
        clip_ids = batch.column("clip_id").to_pylist()
        label_indexes = batch.column("label_indexes").to_pylist()
        label_mids = batch.column("label_mids").to_pylist()
        rates = batch.column("sample_rate").to_pylist()
        waveforms = list_column_to_arrays(batch.column("waveform"))

        rows: dict[str, list] = {name: [] for name in ANCHOR_SCHEMA.names}
        anchor_audio: list[np.ndarray] = []
        # Clips of one length and rate go through the SED together.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, w in enumerate(waveforms):
            groups.setdefault((w.size, rates[i]), []).append(i)
        placed: list[tuple[int, int, int, int, float]] = []  # (clip row, label pos, start, end, score)
        for (samples, rate), members in groups.items():
            geometry = self.geometry(samples, rate)
            (framewise,) = self._forward(self.sed, np.stack([waveforms[i] for i in members]), ("framewise_output",))
            for k, i in enumerate(members):
                columns = []
                for mid in label_mids[i]:
                    if mid not in self._sed_column:
                        raise ConfigError(f"{clip_ids[i]}: label {mid} is not a class of the SED tagger")
                    columns.append(self._sed_column[mid])
                curves = torch.from_numpy(np.ascontiguousarray(framewise[k][:, columns].T))  # (labels, frames)
                for j, mid in enumerate(label_mids[i]):
                    prob = curves[j].numpy()
                    if config.mode == "max_area":
                        others = torch.cat((curves[:j], curves[j + 1 :]))
                        start, end = max_area_anchor(curves[j], geometry, others, config.other_label_penalty)
                    else:
                        start, end = random_anchor(config.seed, clip_ids[i], mid, geometry)
                    placed.append((i, j, start, end, anchor_score(prob, start, geometry)))
        placed.sort(key=lambda p: (p[0], p[1]))  # clip order, then label order
        for i, j, start, end, score in placed:
            mid = label_mids[i][j]
            rows["anchor_id"].append(make_anchor_id(clip_ids[i], mid, config.mode))
            rows["clip_id"].append(clip_ids[i])
            rows["class_index"].append(label_indexes[i][j])
            rows["class_mid"].append(mid)
            rows["start_sample"].append(start)
            rows["end_sample"].append(end)
            rows["score"].append(score)
            rows["mode"].append(config.mode)
            rows["clip_label_indexes"].append(label_indexes[i])
            anchor_audio.append(waveforms[i][start:end])

        if anchor_audio:
            audio = np.stack(anchor_audio)  # (anchors, anchor_samples)
            at_soft, embedding = self._forward(self.tagger, audio, ("clipwise_output", "embedding"))
        else:
            audio = np.zeros((0, 0), np.float32)
            at_soft = embedding = np.zeros((0, 0), np.float32)
        columns = []
        for f in ANCHOR_SCHEMA:
            if f.name == "waveform":
                columns.append(float_list_array(audio))
            elif f.name == "condition_at_soft":
                columns.append(float_list_array(at_soft))
            elif f.name == "condition_embedding":
                columns.append(float_list_array(embedding))
            else:
                columns.append(pa.array(rows[f.name], type=f.type))
        return pa.Table.from_arrays(columns, schema=ANCHOR_SCHEMA)


# --------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class MiningResult:
    """What :func:`mine_anchors` wrote and how long it took."""

    anchors_uri: str
    num_clips: int
    num_anchors: int
    seconds: float
    cpus: float  # CPUs the actors compute on: actors * max(cpus_per_actor, torch_threads)

    @property
    def clips_per_second(self) -> float:
        return self.num_clips / self.seconds if self.seconds > 0 else math.nan

    @property
    def clips_per_second_per_cpu(self) -> float:
        return self.clips_per_second / self.cpus if self.cpus > 0 else math.nan


def check_clips(clips_uri: str, config: MiningConfig, filesystem: Any = None) -> int:
    """Fail early (ConfigError) if the clips' labels are unknown to either tagger's SED label
    set, or the clips are too short or at another rate. Reads only small columns; returns the
    number of clips."""
    meta = read_table(
        clips_uri, filesystem, schema=CLIP_SCHEMA, columns=["label_mids", "sample_rate", "num_samples"]
    )
    if meta.num_rows == 0:
        return 0
    sed_labels = _tagger_labels(config.sed_tagger, config.audioset_labels, filesystem)
    mids = set(pc.unique(pc.list_flatten(meta.column("label_mids"))).to_pylist())
    unknown = sorted(m for m in mids if not sed_labels.has_mid(m))
    if unknown:
        raise ConfigError(
            f"{len(unknown)} clip label(s) are not classes of the SED tagger {config.sed_tagger}: "
            f"{', '.join(unknown[:10])}; mine with a tagger trained on the clips' label set"
        )
    min_samples = pc.min(meta.column("num_samples")).as_py()
    for rate in pc.unique(meta.column("sample_rate")).to_pylist():  # 100 SED frames per second
        AnchorGeometry(rate, rate // 100, min_samples, config.anchor_seconds).validate()
    return meta.num_rows


def _tagger_labels(uri: str, audioset_labels: LabelSet | None, filesystem: Any) -> LabelSet:
    """The label set of a tagger checkpoint, from its config.json alone (no weights)."""
    from uss_core.checkpoints import CONFIG_FILE, TAGGER_FORMAT_NAME, read_checkpoint_document

    if has_scheme(uri):
        fs, path = resolve_filesystem(uri, filesystem)
        is_dir = fs.get_file_info(path).type == pafs.FileType.Directory
        if is_dir:
            import json

            with fs.open_input_stream(f"{path}/{CONFIG_FILE}") as f:
                return LabelSet.from_records(json.loads(f.read())["labels"])
    elif Path(uri).is_dir():
        return LabelSet.from_records(read_checkpoint_document(uri, TAGGER_FORMAT_NAME)["labels"])
    if audioset_labels is None:
        raise ConfigError(f"{uri} carries no label set (a PANNs checkpoint): pass the AudioSet label list")
    return audioset_labels


def mine_anchors(clips_uri: str, anchors_uri: str, config: MiningConfig, filesystem: Any = None) -> MiningResult:
    """Mine the anchors of every clip at ``clips_uri`` and write them to ``anchors_uri``.

    Both URIs are Parquet dataset folders, local or ``s3://`` (through ``filesystem``, see
    :func:`~pipelines.schemas.resolve_filesystem`); the output folder is replaced.
    """
    import ray.data

    from pipelines.sources import write_dataset

    t0 = time.perf_counter()
    num_clips = check_clips(clips_uri, config, filesystem)
    fs, path = resolve_filesystem(clips_uri, filesystem)
    clips = ray.data.read_parquet(path, filesystem=fs, schema=CLIP_SCHEMA)
    anchors = clips.map_batches(
        AnchorMiner,
        fn_constructor_kwargs={"config": config, "filesystem": filesystem},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        concurrency=(1, config.actors),
        num_cpus=config.cpus_per_actor,
        zero_copy_batch=True,
    )
    write_dataset(anchors, anchors_uri, filesystem, schema=ANCHOR_SCHEMA)
    seconds = time.perf_counter() - t0
    num_anchors = count_rows(anchors_uri, filesystem)
    cpus = config.actors * max(config.cpus_per_actor, config.torch_threads)
    return MiningResult(anchors_uri, num_clips, num_anchors, seconds, cpus)


# --------------------------------------------------------------------------------------------
# Accuracy against true event times (the demo corpus's events.parquet)


@dataclass(frozen=True)
class AnchorAccuracy:
    """Anchor accuracy of one mode: ``correct`` of ``total`` anchors overlap a true event of
    their class in their clip by at least half their length; ``unmatched``: anchors whose
    (clip, class) has no event at all (counted wrong). ``own_class_share`` /
    ``other_class_share``: the mean fraction of an anchor's time that events of its class / of
    the clip's other classes cover (how much of the training target is the class, and how much
    is another sound)."""

    mode: str
    total: int
    correct: int
    unmatched: int
    own_class_share: float
    other_class_share: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan


def _covered_seconds(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of ``[start, end)`` covered by the union of ``intervals``."""
    covered, reach = 0.0, start
    for on, off in sorted(intervals):
        on, off = max(on, reach), min(off, end)
        if off > on:
            covered += off - on
            reach = off
    return covered


def anchor_accuracy(anchors: pa.Table, events: pa.Table, sample_rate: int = 32000) -> list[AnchorAccuracy]:
    """Accuracy per mode (sorted by mode) of ``anchors`` against true ``events``.

    ``anchors``: ``clip_id`` (``"<shard stem>/<key>"``), ``class_mid``, ``start_sample``,
    ``end_sample``, ``mode``. ``events``: the demo corpus's ``events.parquet`` (``shard``,
    ``clip_id`` = the shard's sample key, ``mid``, ``onset_seconds``, ``offset_seconds``), joined
    on (shard, key, mid). An anchor is correct if one event overlaps it by at least half its
    length (events are not merged; the demo has at most one event per class and clip).
    """
    intervals: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = {}
    for shard, key, mid, on, off in zip(
        *(events.column(n).to_pylist() for n in ("shard", "clip_id", "mid", "onset_seconds", "offset_seconds"))
    ):
        intervals.setdefault((shard, key), {}).setdefault(mid, []).append((on, off))
    stats: dict[str, list[float]] = {}
    for clip_id, mid, start, end, mode in zip(
        *(anchors.column(n).to_pylist() for n in ("clip_id", "class_mid", "start_sample", "end_sample", "mode"))
    ):
        shard, _, key = clip_id.partition("/")
        counts = stats.setdefault(mode, [0, 0, 0, 0.0, 0.0])
        counts[0] += 1
        clip_events = intervals.get((shard, key), {})
        a0, a1 = start / sample_rate, end / sample_rate
        others = [iv for other, ivs in clip_events.items() if other != mid for iv in ivs]
        counts[4] += _covered_seconds(others, a0, a1) / (a1 - a0)
        found = clip_events.get(mid)
        if not found:
            counts[2] += 1
            continue
        counts[3] += _covered_seconds(found, a0, a1) / (a1 - a0)
        best = max(min(a1, off) - max(a0, on) for on, off in found)
        counts[1] += int(best >= 0.5 * (a1 - a0) - 1e-9)
    return [
        AnchorAccuracy(mode, int(c[0]), int(c[1]), int(c[2]), c[3] / c[0], c[4] / c[0])
        for mode, c in sorted(stats.items())
    ]


__all__ = [
    "AnchorAccuracy",
    "anchor_accuracy",
    "AnchorGeometry",
    "AnchorMiner",
    "MiningConfig",
    "MiningResult",
    "anchor_score",
    "check_clips",
    "load_tagger_from",
    "max_area_anchor",
    "max_area_scores",
    "mine_anchors",
    "random_anchor",
]
