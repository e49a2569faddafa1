"""Mixing: anchors dataset -> training mixtures (and an evaluation set), deterministically.

Each mixture is a group of ``mix_num`` anchors (default 2) whose clips share no weak label: the
first anchor is the target, the others are partners, each rescaled to the target's energy
(:func:`energy_gain`, the reference's ``AnchorSegmentMixer`` with ``match_energy=True``:
``gain = sqrt(E(target) / max(E(partner), 1e-10))`` clamped to ``[0.02, 50]``, ``E`` the mean
square) and summed with it. Rows follow :data:`~pipelines.schemas.MIXTURE_SCHEMA`; the target is
the anchor's own audio (``target_gain`` = 1) and the mixture carries both of the target anchor's
query conditions (``condition_at_soft`` and ``condition_embedding``).

What is kept from the reference mixer: the energy match and its clamp, each partner matched to
the target (not to the running sum), no normalisation of the sum. The reference has no random
gain augmentation, so neither has this (``target_gain`` is always 1.0). What differs: the
reference pairs anchor ``n`` of a training batch with anchor ``n + 1`` without looking at labels
(its balanced sampler makes clashes rare); here a partner's clip must share no label with the
target's clip or with the other partners' clips, so the target class is never in the partners.

Pairing (:func:`plan_mixtures`), in the driver over ids and labels only, so it does not depend
on how Ray splits the data:

1. anchors are sorted by ``anchor_id`` and put in a random order drawn from ``seed``
   (``numpy.random.default_rng([seed, 0])`` permutation; ``[seed, 1]`` for the evaluation set);
2. every anchor in that order is a target once; its partners are the next anchors after it in
   the order (cyclically, like the reference's ``n + 1``) whose clips share no label with the
   group so far; a target with no such partner within ``max_search`` candidates is dropped and
   counted.

So every anchor is a target once and a partner about ``mix_num - 1`` times. Mixture ``i`` goes to
file ``part-{i // mixtures_per_file:06d}.parquet``; the audio is built in parallel (a Ray Data
shuffle brings the anchors of each file together) and each file is written whole by one task,
rows in plan order. Same anchors + same config -> byte-identical files, whatever the block layout.

Evaluation set (like the reference's ``create_audioset_evaluation_meta``: per class, ``N``
2-s mixture/target pairs of anchors mixed with an anchor of another class, energy-matched): with
``eval_per_class > 0``, clips are held out by a hash of their id alone (:func:`is_held_out`:
the first 8 bytes of ``sha256(clip_id)`` as a fraction of 2**64 below ``eval_fraction``; the
seed does not move it, so every run holds out the same clips). Anchors of held-out clips never go
into training mixtures; for each class (ascending index) the first ``eval_per_class`` of its
held-out anchors in the evaluation order are targets, partnered from the held-out anchors by
the same rule. Classes with fewer held-out anchors get fewer pairs (counted per class).
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.schemas import (
    ANCHOR_SCHEMA,
    MIXTURE_SCHEMA,
    float_list_array,
    list_column_to_arrays,
    make_mixture_id,
    read_table,
    resolve_filesystem,
)
from uss_core.errors import ConfigError

GAIN_MIN, GAIN_MAX = 0.02, 50.0  # the reference's clamp of the energy-match gain
ENERGY_EPS = 1e-10
SPLITS = ("train", "eval")

# --------------------------------------------------------------------------------------------
# Audio: pure functions


def energy(x: np.ndarray) -> float:
    """Mean square of ``x (samples,)`` (in float64)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x * x)) if x.size else 0.0


def energy_gain(target: np.ndarray, partner: np.ndarray) -> float:
    """The gain that gives ``partner`` the energy of ``target``: the reference's
    ``get_energy_ratio``, ``sqrt(E(target) / max(E(partner), 1e-10))`` clamped to [0.02, 50]."""
    ratio = math.sqrt(energy(target) / max(energy(partner), ENERGY_EPS))
    return float(min(max(ratio, GAIN_MIN), GAIN_MAX))


def mix(target: np.ndarray, partners: Sequence[np.ndarray], match_energy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(mixture (samples,), partner gains (partners,))``: ``target + sum(gain_i * partner_i)``.

    Float32 arithmetic, partners added in order (so results are reproducible bit for bit).
    """
    target = np.asarray(target, dtype=np.float32)
    mixture = target.copy()
    gains = np.ones(len(partners), dtype=np.float32)
    for i, partner in enumerate(partners):
        partner = np.asarray(partner, dtype=np.float32)
        if partner.shape != target.shape:
            raise ValueError(f"partner {i} has {partner.shape} samples, the target {target.shape}")
        if match_energy:
            gains[i] = np.float32(energy_gain(target, partner))
        mixture += partner * gains[i]
    return mixture, gains


# --------------------------------------------------------------------------------------------
# Config and plan


@dataclass(frozen=True)
class MixingConfig:
    """How anchors are grouped and mixed.

    ``max_search``: candidates scanned for each partner before the target is dropped.
    ``mixtures_per_file``: rows per output Parquet file (about 0.5 MB each for 2-s anchors).
    ``eval_per_class`` > 0 with ``eval_fraction`` of clips held out makes the evaluation set.
    ``shuffle_partitions``: at most this many partitions for the shuffle that gathers each
    file's anchors; ``num_cpus``: CPUs per task.
    """

    mix_num: int = 2
    seed: int = 0
    match_energy: bool = True
    mixtures_per_file: int = 64
    max_search: int = 1000
    eval_per_class: int = 0
    eval_fraction: float = 0.1
    shuffle_partitions: int = 16
    num_cpus: float = 0.5

    def __post_init__(self) -> None:
        if self.mix_num < 2:
            raise ConfigError(f"mix_num must be >= 2 (a target and at least one partner), got {self.mix_num}")
        for name in ("mixtures_per_file", "max_search", "shuffle_partitions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_per_class < 0:
            raise ConfigError(f"eval_per_class must be >= 0, got {self.eval_per_class}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not self.num_cpus > 0:
            raise ConfigError(f"num_cpus must be > 0, got {self.num_cpus}")


def is_held_out(clip_id: str, fraction: float) -> bool:
    """Whether ``clip_id`` is in the evaluation hold-out: ``sha256(clip_id)``'s first 8 bytes,
    as a fraction of 2**64, below ``fraction`` (independent of any seed)."""
    digest = hashlib.sha256(clip_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclass
class MixturePlan:
    """Which anchors make which mixtures. ``groups[split]``: anchor ids per mixture, target
    first, in output order; ``dropped[split]``: targets that found no partner;
    ``eval_counts``: evaluation mixtures per class index."""

    groups: dict[str, list[tuple[str, ...]]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    dropped: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    eval_counts: dict[int, int] = field(default_factory=dict)


def _find_partners(
    order: list[int], position: int, labels: list[frozenset], mix_num: int, max_search: int
) -> list[int] | None:
    """Rows of the partners of ``order[position]``: the next rows (cyclically) whose label sets
    are disjoint from the group's so far; None if fewer than ``mix_num - 1`` within ``max_search``."""
    target = order[position]
    used = set(labels[target])
    partners: list[int] = []
    for step in range(1, min(len(order), max_search + 1)):
        candidate = order[(position + step) % len(order)]
        if used.isdisjoint(labels[candidate]):
            partners.append(candidate)
            used |= labels[candidate]
            if len(partners) == mix_num - 1:
                return partners
    return None


def plan_mixtures(meta: pa.Table, config: MixingConfig, make_eval: bool) -> MixturePlan:
    """Group anchors into mixtures (see the module docstring for the rule).

    ``meta``: the anchors' ``anchor_id``, ``clip_id``, ``class_index`` and ``clip_label_indexes``
    columns (any row order: they are sorted by ``anchor_id`` first). ``make_eval``: hold out
    clips and plan the evaluation set too.
    """
    meta = meta.take(pc.sort_indices(meta, [("anchor_id", "ascending")]))
    ids = meta.column("anchor_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ConfigError("anchor ids are not unique: the anchors dataset holds duplicates (mined twice into it?)")
    clip_ids = meta.column("clip_id").to_pylist()
    classes = meta.column("class_index").to_pylist()
    labels = [frozenset(v) for v in meta.column("clip_label_indexes").to_pylist()]
    held = [make_eval and is_held_out(c, config.eval_fraction) for c in clip_ids]
    plan = MixturePlan()

    train_rows = [i for i in range(len(ids)) if not held[i]]
    order = [train_rows[i] for i in np.random.default_rng([config.seed, 0]).permutation(len(train_rows))]
    for position, target in enumerate(order):
        partners = _find_partners(order, position, labels, config.mix_num, config.max_search)
        if partners is None:
            plan.dropped["train"] += 1
        else:
            plan.groups["train"].append(tuple(ids[r] for r in [target, *partners]))

    if make_eval and config.eval_per_class > 0:
        eval_rows = [i for i in range(len(ids)) if held[i]]
        order = [eval_rows[i] for i in np.random.default_rng([config.seed, 1]).permutation(len(eval_rows))]
        for class_index in sorted({classes[r] for r in order}):
            taken = 0
            for position, target in enumerate(order):
                if taken == config.eval_per_class:
                    break
                if classes[target] != class_index:
                    continue
                partners = _find_partners(order, position, labels, config.mix_num, config.max_search)
                if partners is None:
                    plan.dropped["eval"] += 1
                    continue
                plan.groups["eval"].append(tuple(ids[r] for r in [target, *partners]))
                taken += 1
            plan.eval_counts[class_index] = taken
    return plan


# --------------------------------------------------------------------------------------------
# Building the files (Ray tasks)

_ROLE_SCHEMA = pa.schema(
    [("anchor_id", pa.string()), ("chunk", pa.int64()), ("mixture", pa.int64()), ("role", pa.int32())]
)


def _roles_table(plan: MixturePlan, mixtures_per_file: int) -> tuple[pa.Table, dict[int, tuple[str, int]]]:
    """One row per (anchor, mixture it is in): chunk (output file, unique over splits), mixture
    (index within its split), role (0 target, 1.. partners); and chunk -> (split, file index)."""
    rows: dict[str, list] = {name: [] for name in _ROLE_SCHEMA.names}
    chunks: dict[int, tuple[str, int]] = {}
    next_chunk = 0
    for split in SPLITS:
        groups = plan.groups[split]
        for file_index in range(math.ceil(len(groups) / mixtures_per_file)):
            chunks[next_chunk + file_index] = (split, file_index)
        for m, group in enumerate(groups):
            for role, anchor_id in enumerate(group):
                rows["anchor_id"].append(anchor_id)
                rows["chunk"].append(next_chunk + m // mixtures_per_file)
                rows["mixture"].append(m)
                rows["role"].append(role)
        next_chunk += math.ceil(len(groups) / mixtures_per_file)
    return pa.Table.from_pydict(rows, schema=_ROLE_SCHEMA), chunks


def _attach_roles(batch: pa.Table, roles: pa.Table) -> pa.Table:
    """Anchors (ANCHOR_SCHEMA) -> one row per role each plays, with the audio and conditions."""
    keys = pa.table({"anchor_id": batch.column("anchor_id"), "_row": pa.array(np.arange(batch.num_rows))})
    joined = keys.join(roles, keys="anchor_id", join_type="inner")  # list columns cannot join: take after
    rows = joined.column("_row")
    taken = batch.select(["class_index", "waveform", "condition_at_soft", "condition_embedding"]).take(rows)
    return pa.Table.from_arrays(
        [joined.column(n) for n in _ROLE_SCHEMA.names] + list(taken.columns),
        names=list(_ROLE_SCHEMA.names) + taken.column_names,
    )


def _write_file(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Write ``table`` as one Parquet file; local files go through a hidden temporary name."""
    if isinstance(fs, pafs.LocalFileSystem):
        folder, name = path.rsplit("/", 1)
        temp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(temp) as f:
            pq.write_table(table, f)
        fs.move(temp, path)
    else:  # object stores: one PUT, visible whole or not at all
        with fs.open_output_stream(path) as f:
            pq.write_table(table, f)


def _build_chunk(
    group: pa.Table, chunks: dict[int, tuple[str, int]], folders: dict[str, tuple[pafs.FileSystem, str]], config: MixingConfig
) -> pa.Table:
    """All role rows of one output file -> the file's mixtures, written; returns its row count."""
    chunk = group.column("chunk")[0].as_py()
    split, file_index = chunks[chunk]
    group = group.take(pc.sort_indices(group, [("mixture", "ascending"), ("role", "ascending")]))
    mixture_index = group.column("mixture").to_numpy()
    roles = group.column("role").to_numpy()
    ids = group.column("anchor_id").to_pylist()
    classes = group.column("class_index").to_pylist()
    waves = list_column_to_arrays(group.column("waveform"))
    at_soft = list_column_to_arrays(group.column("condition_at_soft"))
    embedding = list_column_to_arrays(group.column("condition_embedding"))

    out: dict[str, list] = {name: [] for name in MIXTURE_SCHEMA.names}
    starts = np.flatnonzero(np.r_[True, mixture_index[1:] != mixture_index[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    for s, e in zip(starts, ends):
        if e - s != config.mix_num or list(roles[s:e]) != list(range(config.mix_num)):
            raise RuntimeError(
                f"mixture {split}/{mixture_index[s]}: got roles {list(roles[s:e])} of {config.mix_num} "
                "(the anchors dataset changed while mixing?)"
            )
        mixture, gains = mix(waves[s], waves[s + 1 : e], config.match_energy)
        out["mixture_id"].append(make_mixture_id(ids[s:e]))
        out["target_anchor_id"].append(ids[s])
        out["partner_anchor_ids"].append(ids[s + 1 : e])
        out["target_class_index"].append(classes[s])
        out["partner_class_indexes"].append(classes[s + 1 : e])
        out["mixture"].append(mixture)
        out["target"].append(waves[s])
        out["condition_at_soft"].append(at_soft[s])
        out["condition_embedding"].append(embedding[s])
        out["target_gain"].append(1.0)
        out["partner_gains"].append(gains)
    columns = [
        float_list_array(out[f.name]) if f.type == pa.list_(pa.float32()) else pa.array(out[f.name], type=f.type)
        for f in MIXTURE_SCHEMA
    ]
    fs, folder = folders[split]
    _write_file(pa.Table.from_arrays(columns, schema=MIXTURE_SCHEMA), fs, f"{folder}/part-{file_index:06d}.parquet")
    return pa.table({"chunk": [chunk], "rows": [len(out["mixture_id"])]})


# --------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class MixingResult:
    """What :func:`mix_anchors` wrote."""

    mixtures_uri: str
    eval_uri: str | None
    num_anchors: int
    num_mixtures: int
    num_eval: int
    dropped: dict[str, int]
    eval_counts: dict[int, int]
    seconds: float


def _prepare_folder(uri: str, filesystem: Any) -> tuple[pafs.FileSystem, str]:
    from pipelines.sources import _check_output

    fs, path = resolve_filesystem(uri, filesystem)
    _check_output(uri, fs, path)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
    return fs, path


def mix_anchors(
    anchors_uri: str,
    mixtures_uri: str,
    config: MixingConfig,
    eval_uri: str | None = None,
    filesystem: Any = None,
) -> MixingResult:
    """Mix the anchors at ``anchors_uri`` into training mixtures at ``mixtures_uri`` (and, with
    ``eval_uri`` and ``config.eval_per_class``, the evaluation set there). Output folders are
    replaced; each holds at least one Parquet file (schema only if no rows)."""
    import ray.data

    from pipelines.sources import _ensure_schema_file

    t0 = time.perf_counter()
    if eval_uri is not None and config.eval_per_class < 1:
        raise ConfigError("an evaluation set needs eval_per_class >= 1")
    if eval_uri is None and config.eval_per_class > 0:
        raise ConfigError("eval_per_class needs an output folder for the evaluation set (eval_uri)")
    meta = read_table(
        anchors_uri,
        filesystem,
        schema=ANCHOR_SCHEMA,
        columns=["anchor_id", "clip_id", "class_index", "clip_label_indexes", "start_sample", "end_sample"],
    )
    lengths = pc.unique(pc.subtract(meta.column("end_sample"), meta.column("start_sample"))).to_pylist()
    if len(lengths) > 1:
        raise ConfigError(f"anchors of different lengths {sorted(lengths)[:5]} cannot be mixed: mine with one length")
    plan = plan_mixtures(meta, config, make_eval=eval_uri is not None)
    roles, chunks = _roles_table(plan, config.mixtures_per_file)

    folders = {"train": _prepare_folder(mixtures_uri, filesystem)}
    if eval_uri is not None:
        folders["eval"] = _prepare_folder(eval_uri, filesystem)
    if chunks:
        fs, path = resolve_filesystem(anchors_uri, filesystem)
        anchors = ray.data.read_parquet(path, filesystem=fs, schema=ANCHOR_SCHEMA)
        anchors = anchors.select_columns(
            ["anchor_id", "class_index", "waveform", "condition_at_soft", "condition_embedding"]
        )
        pieces = anchors.map_batches(
            _attach_roles, batch_format="pyarrow", fn_kwargs={"roles": roles}, num_cpus=config.num_cpus
        )
        written = (
            pieces.groupby("chunk", num_partitions=min(len(chunks), config.shuffle_partitions))
            .map_groups(
                _build_chunk,
                batch_format="pyarrow",
                fn_kwargs={"chunks": chunks, "folders": folders, "config": config},
                num_cpus=config.num_cpus,
            )
            .take_all()
        )
        expected = {s: len(plan.groups[s]) for s in SPLITS}
        got = {s: 0 for s in SPLITS}
        for row in written:
            got[chunks[row["chunk"]][0]] += row["rows"]
        if got != expected or len(written) != len(chunks):
            raise RuntimeError(f"wrote {got} mixtures in {len(written)} files, planned {expected} in {len(chunks)}")
    for fs, path in folders.values():
        _ensure_schema_file(fs, path, MIXTURE_SCHEMA)
    return MixingResult(
        mixtures_uri,
        eval_uri,
        meta.num_rows,
        len(plan.groups["train"]),
        len(plan.groups["eval"]),
        dict(plan.dropped),
        dict(plan.eval_counts),
        time.perf_counter() - t0,
    )


__all__ = [
    "GAIN_MAX",
    "GAIN_MIN",
    "MixingConfig",
    "MixingResult",
    "MixturePlan",
    "energy",
    "energy_gain",
    "is_held_out",
    "mix",
    "mix_anchors",
    "plan_mixtures",
]
