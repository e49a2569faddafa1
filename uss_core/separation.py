"""The separation engine: chunking, batched query-conditioned separation, overlap-add.

This module owns how long audio becomes segments and how separated segments become audio again;
the single-file command, the bulk pipeline and validation all go through it.

- :class:`SegmentPlan` cuts a signal into fixed-length segments with a given overlap; the last
  segment is zero-padded. With overlap 0 and 2-s segments this is the reference's chunking.
- :class:`OverlapAdd` recombines segments with transition weights normalised by their sum
  (a raised-cosine ramp over the overlap), so an identity separator reconstructs the input
  exactly and boundaries have neither clicks nor level dips.
- :class:`Separator` holds a loaded model and runs one batch of segments against many queries:
  the tagger and query net run once per segment, segments where the tagger finds none of a
  query's classes (below ``activity_threshold``) are skipped, and the remaining
  segment x query pairs go through the U-Net in batches of at most ``batch_size``, in the
  arithmetic ``precision`` names (:func:`resolve_precision`: by default bf16 autocast on a CPU
  with AMX, 2.3-2.4x faster there, else fp32).
- :func:`separate_stream` drives it over a stream, so memory stays bounded for any file length.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from uss_core.checkpoints import LoadedModel
from uss_core.errors import ConfigError, UssError
from uss_core.ontology import LabelSet, Ontology


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(precision: str) -> None:
    """Raise a :class:`ConfigError` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


@dataclass(frozen=True)
class SeparationConfig:
    """How a signal is chunked and separated.

    ``precision`` is the U-Net's arithmetic: ``fp32`` (exact, the reference's numbers), ``bf16``
    (autocast: on a CPU with AMX, or a GPU; with ResUNet30 the stems came within
    about 33 dB SNR of fp32's in ``benchmarks.bench_separate``, and the demo separator's SDRi
    did not move, README), ``fp16`` (GPU only) or ``auto`` (:func:`resolve_precision`).
    The tagger and query net always run in fp32, so activity decisions do not depend on it.
    """

    segment_seconds: float = 2.0
    overlap: float = 0.25  # fraction of a segment shared with the next one, in [0, 1)
    # Segment x query pairs per U-Net forward. ResUNet30 activations take about 0.4 GB per pair
    # on CPU, and CPU speed is flat in the batch size (README, Performance: 45.6 / 45.3 / 45.2 s
    # at 1 / 2 / 4), so 2 keeps the peak low (2.11 GB on a one-hour input). On a GPU, larger
    # batches do pay: raise it there.
    batch_size: int = 2
    activity_threshold: float = 0.2  # tagger probability below which a query is skipped in a segment
    device: str = "cpu"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not 0.1 <= self.segment_seconds <= 60:
            raise ConfigError(f"segment length must be between 0.1 and 60 s, got {self.segment_seconds}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap is a fraction of the segment in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Query:
    """What one output stem holds.

    Exactly one of ``class_indexes`` (a class set: one class, a union, or an ontology node's
    subtree) and ``condition`` (a precomputed condition vector, e.g. from example audio) is set.
    """

    name: str
    class_indexes: tuple[int, ...] | None = None
    condition: np.ndarray | None = field(default=None, compare=False)
    level: int | None = None  # ontology level, for hierarchical queries
    mid: str | None = None  # ontology node id, for hierarchical queries
    gated: bool = True  # skip segments where the tagger finds none of the classes

    def __post_init__(self) -> None:
        if (self.class_indexes is None) == (self.condition is None):
            raise ConfigError(f"query {self.name!r}: give either class indexes or a condition")
        if self.class_indexes is not None and not self.class_indexes:
            raise ConfigError(f"query {self.name!r}: empty class set")


# ---------------------------------------------------------------------------------------------
# Chunking and overlap-add


@dataclass(frozen=True)
class SegmentPlan:
    """Fixed-length segments every ``hop_samples`` covering ``num_samples`` (last one zero-padded)."""

    num_samples: int
    segment_samples: int
    hop_samples: int

    @classmethod
    def create(cls, num_samples: int, sample_rate: int, segment_seconds: float, overlap: float) -> "SegmentPlan":
        segment = int(round(segment_seconds * sample_rate))
        overlap_samples = int(round(segment * overlap))
        return cls(num_samples, segment, max(1, segment - overlap_samples))

    @property
    def overlap_samples(self) -> int:
        return self.segment_samples - self.hop_samples

    @property
    def num_segments(self) -> int:
        if self.num_samples <= self.segment_samples:
            return 1
        return 1 + math.ceil((self.num_samples - self.segment_samples) / self.hop_samples)

    def start(self, index: int) -> int:
        return index * self.hop_samples

    def window(self) -> np.ndarray:
        """Transition weights ``(segment_samples,)``: 1 in the middle, a raised-cosine ramp over
        the overlap at both ends, never 0 (so every sample has a positive weight sum)."""
        weights = np.ones(self.segment_samples, dtype=np.float64)
        ramp = self.overlap_samples
        if ramp > 0:
            rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
            weights[:ramp] = rise
            weights[-ramp:] = rise[::-1]
        return weights


def iter_segments(read: Callable[[int], np.ndarray], plan: SegmentPlan) -> Iterator[np.ndarray]:
    """Segments ``(segment_samples,)`` of a stream, in order, holding at most one segment in memory.

    ``read(n)`` returns the next ``n`` samples (fewer at the end).
    """
    buffer = np.zeros(0, dtype=np.float32)
    consumed = 0  # stream position of buffer[0]
    for index in range(plan.num_segments):
        start = plan.start(index)
        end = start + plan.segment_samples
        if start > consumed:
            buffer = buffer[start - consumed :]
            consumed = start
        missing = end - consumed - len(buffer)
        if missing > 0:
            block = read(missing)
            buffer = np.concatenate([buffer, block.astype(np.float32, copy=False)])
        segment = buffer[: plan.segment_samples]
        if len(segment) < plan.segment_samples:
            segment = np.pad(segment, (0, plan.segment_samples - len(segment)))
        yield segment


class OverlapAdd:
    """Streaming weighted overlap-add of ``num_stems`` parallel outputs.

    Feed segments in order with :meth:`add` (``None`` for a stem that was skipped: it contributes
    silence with full weight); :meth:`pop_ready` returns the samples no later segment can change.
    """

    def __init__(self, plan: SegmentPlan, num_stems: int) -> None:
        self.plan = plan
        self.window = plan.window()
        self.num_stems = num_stems
        self._acc = np.zeros((num_stems, 0), dtype=np.float64)
        self._weight = np.zeros(0, dtype=np.float64)
        self._origin = 0  # stream position of _acc[:, 0]
        self._next_index = 0

    def add(self, index: int, outputs: Sequence[np.ndarray | None]) -> None:
        if index != self._next_index:
            raise ValueError(f"segments must be added in order: expected {self._next_index}, got {index}")
        start = self.plan.start(index) - self._origin
        end = start + self.plan.segment_samples
        if end > self._acc.shape[1]:
            grow = end - self._acc.shape[1]
            self._acc = np.pad(self._acc, ((0, 0), (0, grow)))
            self._weight = np.pad(self._weight, (0, grow))
        self._weight[start:end] += self.window
        for stem, output in enumerate(outputs):
            if output is not None:
                self._acc[stem, start:end] += self.window * output
        self._next_index += 1

    def pop_ready(self, final: bool = False) -> np.ndarray:
        """Finished samples ``(num_stems, n)`` (float32); with ``final``, everything up to the
        signal length."""
        end = self.plan.num_samples if final else min(self.plan.start(self._next_index), self.plan.num_samples)
        ready = max(0, min(end - self._origin, self._acc.shape[1]))
        out = self._acc[:, :ready] / self._weight[:ready]
        self._acc = self._acc[:, ready:]
        self._weight = self._weight[ready:]
        self._origin += ready
        return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Queries


def class_queries(labels: LabelSet, specs: Sequence[str | int | Sequence[str | int]]) -> list[Query]:
    """One query per spec: a label (name or mid), a class index, or a sequence of those (a union
    in one stem). Unknown labels raise LabelError with suggestions."""
    queries = []
    for spec in specs:
        items = [spec] if isinstance(spec, (str, int)) else list(spec)
        indexes = tuple(labels.resolve_index(i) if isinstance(i, int) else labels.resolve(i) for i in items)
        name = " + ".join(labels.name_of(i) for i in indexes)
        queries.append(Query(name=name, class_indexes=indexes))
    return queries


def hierarchy_queries(ontology: Ontology, labels: LabelSet, levels: Sequence[int]) -> list[Query]:
    """One query per ontology node at each level whose subtree holds classes of ``labels``
    (condition: tagging probabilities masked to the subtree, as the reference)."""
    queries = []
    for level in levels:
        if level < 1 or level > ontology.max_level:
            raise ConfigError(f"ontology level must be between 1 and {ontology.max_level}, got {level}")
        for node in ontology.nodes_at_level(level):
            indexes = ontology.subtree_indexes(node.mid, labels)
            if indexes:
                queries.append(Query(name=node.name, class_indexes=tuple(indexes), level=level, mid=node.mid))
    return queries


# ---------------------------------------------------------------------------------------------
# The batched separator


@dataclass
class BatchResult:
    """Separated segments of one batch.

    ``outputs[q][b]`` is segment ``b`` separated for query ``q`` ``(segment_samples,)``, or None if
    the query was inactive there; ``activity[b, q]`` is the tagger's max probability over the
    query's classes (NaN where not applicable).
    """

    outputs: list[list[np.ndarray | None]]
    activity: np.ndarray
    seconds_tagging: float
    seconds_separating: float
    pairs_separated: int


class Separator:
    """A loaded model, ready to separate batches of segments for many queries at once."""

    def __init__(self, loaded: LoadedModel, config: SeparationConfig = SeparationConfig()) -> None:
        self.loaded = loaded
        self.config = config
        self.device = torch.device(_resolve_device(config.device))
        self.precision = resolve_precision(config.precision, self.device)  # what "auto" became here
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ConfigError("fp16 separation needs a GPU; on CPU use --precision bf16 or fp32")
        model = loaded.model.eval().to(self.device)
        if self.device.type == "cpu":
            # oneDNN convolutions are markedly faster on channels-last tensors on CPU.
            model.ss_model.to(memory_format=torch.channels_last)
            keep_freed_memory()
        self.model = model
        self.sample_rate = model.config.sample_rate
        self.tagger = model.activity_tagger()

    def check_queries(self, queries: Sequence[Query]) -> None:
        """Raise a clear error for queries this model cannot answer."""
        qcfg = self.model.config.query_net
        for q in queries:
            if q.class_indexes is not None:
                self.model.query_net.require_class_queries()
                if max(q.class_indexes) >= len(self.loaded.labels):
                    raise ConfigError(f"query {q.name!r}: class index out of range for this model's labels")
            elif q.condition.shape != (qcfg.condition_size,):
                raise ConfigError(
                    f"query {q.name!r}: condition has shape {q.condition.shape}, the model expects "
                    f"({qcfg.condition_size},)"
                )

    @torch.inference_mode()
    def separate_batch(self, segments: np.ndarray, queries: Sequence[Query]) -> BatchResult:
        """Separate ``segments (batch, segment_samples)`` for every query (see :class:`BatchResult`)."""
        t0 = time.perf_counter()
        audio = torch.from_numpy(np.ascontiguousarray(segments, dtype=np.float32)).to(self.device)
        batch = audio.shape[0]
        class_queries_present = any(q.class_indexes is not None for q in queries)
        qnet = self.model.query_net
        probs = bottleneck = None
        if class_queries_present and self.tagger is not None:
            probs = self.tagger(audio)["clipwise_output"]
        if class_queries_present:
            shares_tagger = self.tagger is qnet.base and qnet.config.bottleneck_type == "at_soft"
            bottleneck = probs if shares_tagger else qnet.bottleneck(audio)

        activity = np.full((batch, len(queries)), np.nan, dtype=np.float32)
        pairs: list[tuple[int, int]] = []  # (query, segment)
        conditions: list[torch.Tensor] = []
        for qi, q in enumerate(queries):
            if q.class_indexes is None:
                cond = torch.as_tensor(q.condition, dtype=torch.float32, device=self.device)
                pairs += [(qi, b) for b in range(batch)]
                conditions.append(cond.expand(batch, -1))
                continue
            index = torch.tensor(q.class_indexes, device=self.device)
            active = torch.ones(batch, dtype=torch.bool, device=self.device)
            if probs is not None:
                query_probs = probs[:, index].amax(dim=1)
                activity[:, qi] = query_probs.cpu().numpy()
                if q.gated:
                    active = query_probs >= self.config.activity_threshold
            mask = torch.zeros(bottleneck.shape[1], device=self.device)
            mask[index] = 1.0
            rows = torch.nonzero(active).flatten()
            if len(rows):
                pairs += [(qi, int(b)) for b in rows]
                conditions.append(qnet.class_condition(bottleneck[rows], mask))
        t1 = time.perf_counter()

        outputs: list[list[np.ndarray | None]] = [[None] * batch for _ in queries]
        if pairs:
            all_conditions = torch.cat(conditions)
            segment_index = torch.tensor([b for _, b in pairs], device=self.device)
            for lo in range(0, len(pairs), self.config.batch_size):
                hi = min(lo + self.config.batch_size, len(pairs))
                mixture = audio[segment_index[lo:hi]].unsqueeze(1)
                with precision_autocast(self.precision, self.device):
                    separated = self.model.ss_model(mixture, all_conditions[lo:hi])
                separated = separated[:, 0].float().cpu().numpy()
                for (qi, b), wave in zip(pairs[lo:hi], separated):
                    outputs[qi][b] = wave
        t2 = time.perf_counter()
        return BatchResult(outputs, activity, t1 - t0, t2 - t1, len(pairs))

    @torch.inference_mode()
    def condition_from_examples(self, examples: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
        """Average query-net condition of example recordings ``[(samples,), ...]`` -> ``(condition_size,)``.

        Silence is removed first; each recording is cut into training-length segments (the last
        one repeated to length), conditioned per segment and averaged; then the recordings are
        averaged, as the reference does.
        """
        from uss_core.audio import remove_silence, repeat_to_length

        segment = int(round(self.model.config.segment_seconds * self.sample_rate))
        per_example = []
        for i, audio in enumerate(examples):
            active = remove_silence(audio, self.sample_rate)
            if len(active) == 0:
                continue
            pieces = [repeat_to_length(active[s : s + segment], segment) for s in range(0, len(active), segment)]
            conditions = []
            for lo in range(0, len(pieces), self.config.batch_size):
                chunk = torch.from_numpy(np.stack(pieces[lo : lo + self.config.batch_size])).to(self.device)
                conditions.append(self.model.query_net(chunk).float().cpu().numpy())
            per_example.append(np.concatenate(conditions).mean(axis=0))
        if not per_example:
            listed = ", ".join(names) if names else f"{len(examples)} recordings"
            raise UssError(f"every query example is silent ({listed}); give examples with audible sound")
        return np.mean(per_example, axis=0).astype(np.float32)


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of unmapping it (Linux only; else a no-op).

    Every U-Net forward allocates and frees activations of tens to hundreds of MB. By default
    glibc serves each with a fresh mmap, and the kernel zero-fills every page on first touch: on
    CPU that costs a quarter or more of the separation time as system time. Turning mmap off and
    trimming off makes later forwards reuse the same memory. Process-wide, so only the entry
    points that run separation call it (through :class:`Separator`).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in AMX tiles (Xeon Sapphire Rapids and
    later), the only CPUs where bf16 convolutions beat fp32 ones. With oneDNN capped below AMX
    (``ONEDNN_MAX_CPU_ISA``) a ResUNet30 pair took 0.51 s in bf16 against 0.35 in fp32 at
    AVX-512 BF16, 1.37 s against 0.33 at plain AVX-512, and 0.12 against 0.34 with AMX
    (``benchmarks.profile_unet``, README). ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is
    no guide: it says yes for any AVX-512 CPU."""
    return torch.backends.mkldnn.is_available() and bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def resolve_precision(precision: str, device: torch.device) -> str:
    """The U-Net arithmetic ``precision`` means on ``device``: itself, except ``auto``, which is
    ``bf16`` on a CPU with AMX (:func:`cpu_has_amx_bf16`) and ``fp32`` elsewhere (GPUs included:
    their fp32 convolutions already use TF32 by default; ask for ``bf16`` there explicitly).

    Why bf16 by default where the CPU has AMX: its AMX convolutions make separation
    2.3-2.4x faster, while stems stay within 33-35 dB SNR of fp32's and separation quality does
    not move (README, Performance). ``fp32`` reproduces the reference.
    """
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_has_amx_bf16() else "fp32"


def precision_autocast(precision: str, device: torch.device):
    """The autocast context for a resolved ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


# ---------------------------------------------------------------------------------------------
# Streaming driver


@dataclass
class StreamResult:
    """Outcome of :func:`separate_stream`."""

    num_samples: int
    num_segments: int
    activity: np.ndarray  # (segments, queries): tagger max probability per query
    active_segments: np.ndarray  # (segments, queries) bool: separated (not skipped)
    pairs_separated: int
    seconds_tagging: float
    seconds_separating: float


def separate_stream(
    separator: Separator,
    read: Callable[[int], np.ndarray],
    num_samples: int,
    queries: Sequence[Query],
    emit: Callable[[np.ndarray], None],
    progress: Callable[[int], None] | None = None,
) -> StreamResult:
    """Separate a stream of ``num_samples`` samples for ``queries``.

    Args:
        read: ``read(n)`` returns the next ``n`` samples of the input (fewer at the end).
        emit: called with finished output blocks ``(num_queries, n)``, in order; all blocks
            together are ``(num_queries, num_samples)``.
        progress: called with the number of segments finished after each batch.
    """
    separator.check_queries(queries)
    cfg = separator.config
    plan = SegmentPlan.create(num_samples, separator.sample_rate, cfg.segment_seconds, cfg.overlap)
    ola = OverlapAdd(plan, len(queries))
    activity = np.full((plan.num_segments, len(queries)), np.nan, dtype=np.float32)
    active = np.zeros((plan.num_segments, len(queries)), dtype=bool)
    pairs = 0
    t_tag = t_sep = 0.0
    # Segments per batch: enough to fill ``batch_size`` U-Net pairs when every query is active.
    segments_per_batch = max(1, cfg.batch_size // max(1, len(queries)))
    segments = iter_segments(read, plan)
    index = 0
    while index < plan.num_segments:
        chunk = [next(segments) for _ in range(min(segments_per_batch, plan.num_segments - index))]
        result = separator.separate_batch(np.stack(chunk), queries)
        for b in range(len(chunk)):
            outs = [result.outputs[q][b] for q in range(len(queries))]
            ola.add(index + b, outs)
            active[index + b] = [o is not None for o in outs]
        activity[index : index + len(chunk)] = result.activity
        index += len(chunk)
        pairs += result.pairs_separated
        t_tag += result.seconds_tagging
        t_sep += result.seconds_separating
        block = ola.pop_ready()
        if block.shape[1]:
            emit(block)
        if progress is not None:
            progress(len(chunk))
    block = ola.pop_ready(final=True)
    if block.shape[1]:
        emit(block)
    return StreamResult(num_samples, plan.num_segments, activity, active, pairs, t_tag, t_sep)
