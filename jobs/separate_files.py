"""``uss separate``: separate audio files on this machine (no Ray needed).

For each input, writes into ``OUTDIR/<input name>/``: one audio file per separated class, class
union, ontology node (``level<N>/``) or example query; ``manifest.json`` (queries, per-segment
activity, model, timings); and ``activity.png`` (query activity over time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from jobs.common import add_query_arguments
from pipelines.model_store import local_checkpoint
from uss_core.audio import AUDIO_EXTENSIONS, AudioFileWriter, load_audio, open_audio_stream
from uss_core.checkpoints import load_model
from uss_core.errors import ConfigError, UssError
from uss_core.ontology import LabelSet, load_ontology, safe_filename
from uss_core.plots import plot_activity
from uss_core.separation import (
    PRECISIONS,
    Query,
    SegmentPlan,
    SeparationConfig,
    Separator,
    class_queries,
    hierarchy_queries,
    separate_stream,
)

DEFAULT_LEVELS = (1, 2, 3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uss separate",
        description="Separate sound classes out of audio files with a query-conditioned USS model.",
        epilog=(
            "Queries: --class/--class-id give one output file each; join several with '+' for their "
            "union in one file (--class 'Piano+Organ', --class-id 0+1+2). With no query, separates "
            "hierarchically: every active AudioSet ontology node at --levels (default 1 2 3)."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files or folders of audio files")
    p.add_argument("-o", "--output-dir", required=True, help="where to write the results")
    p.add_argument("--checkpoint", required=True,
                   help="uss-at-scale checkpoint folder or official USS .ckpt; local, s3:// or models:/NAME/VERSION")
    p.add_argument("--tagger-checkpoint", help="PANNs Cnn14 checkpoint used to detect active segments")
    p.add_argument("--labels-csv", help="label set (class_labels_indices.csv format) for an official checkpoint")
    p.add_argument("--metadata-dir", help="folder with AudioSet ontology.json and class_labels_indices.csv")
    add_query_arguments(p)
    s = p.add_argument_group("separation")
    s.add_argument("--segment-seconds", type=float, help="segment length (default: the model's training length)")
    s.add_argument("--overlap", type=float, default=SeparationConfig.overlap, help="fraction of segment overlap")
    s.add_argument("--batch-size", type=int, default=SeparationConfig.batch_size, help="pairs per forward pass")
    s.add_argument("--activity-threshold", type=float, default=SeparationConfig.activity_threshold)
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    s.add_argument("--precision", choices=PRECISIONS, default=SeparationConfig.precision,
                   help="U-Net arithmetic: fp32 (exact, the reference's numbers), bf16 (faster on CPUs with AMX and on "
                        "GPUs), fp16 (GPU), auto (the default: bf16 on a CPU with AMX, else fp32)")
    s.add_argument("--format", choices=("wav", "flac"), default="wav")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _parse_class_ids(values: list[str]) -> list[list[int]]:
    specs = []
    for value in values:
        try:
            specs.append([int(v) for v in value.split("+")])
        except ValueError:
            raise ConfigError(f"--class-id takes integers joined by '+', got {value!r}") from None
    return specs


def _collect_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                raise UssError(f"{path}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UssError(f"input not found: {path}")
    return files


def _output_dirs(files: list[Path], output_dir: Path) -> list[Path]:
    """One folder per input, named after it; inputs with the same name get a numeric suffix."""
    seen: dict[str, int] = {}
    dirs = []
    for f in files:
        name = safe_filename(f.stem)
        seen[name] = seen.get(name, 0) + 1
        dirs.append(output_dir / (name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return dirs


def build_queries(args, separator: Separator, labels: LabelSet) -> list[Query]:
    """The queries the command line asks for (see the parser's epilog)."""
    class_specs: list = [c.split("+") for c in args.classes] + _parse_class_ids(args.class_ids)
    kinds = sum([bool(class_specs), bool(args.query_audio), bool(args.levels)])
    if kinds > 1:
        raise ConfigError("use one kind of query: --class/--class-id, --query-audio, or --levels")
    if class_specs:
        return class_queries(labels, class_specs)
    if args.query_audio:
        queries = []
        for folder in args.query_audio:
            examples = _collect_inputs([folder])
            condition = separator.condition_from_examples(
                [load_audio(f, separator.sample_rate) for f in examples], [str(f) for f in examples]
            )
            queries.append(Query(name=f"query-{Path(folder).name}", condition=condition, gated=False))
        return queries
    ontology = load_ontology(args.metadata_dir)
    return hierarchy_queries(ontology, labels, args.levels or DEFAULT_LEVELS)


def _stem_path(query: Query, fmt: str) -> str:
    name = safe_filename(query.name) + "." + fmt
    return f"level{query.level}/{name}" if query.level is not None else name


def separate_file(
    path: Path, out_dir: Path, separator: Separator, queries: list[Query], fmt: str, quiet: bool
) -> dict:
    """Separate one file into ``out_dir``; returns its manifest (also written as manifest.json)."""
    t_start = time.perf_counter()
    rate = separator.sample_rate
    stem_paths = [_stem_path(q, fmt) for q in queries]
    with open_audio_stream(path, rate) as stream:
        writers = [AudioFileWriter(out_dir / rel, rate, fmt) for rel in stem_paths]
        bar = None
        if not quiet:
            from tqdm import tqdm

            cfg = separator.config
            plan = SegmentPlan.create(stream.num_samples, rate, cfg.segment_seconds, cfg.overlap)
            bar = tqdm(desc=path.name, unit="seg", total=plan.num_segments, leave=False, file=sys.stderr)
        try:

            def emit(block: np.ndarray) -> None:
                for writer, samples in zip(writers, block):
                    writer.write(samples)

            result = separate_stream(
                separator, stream.read, stream.num_samples, queries, emit, progress=bar.update if bar else None
            )
            written = []
            for query, writer, active in zip(queries, writers, result.active_segments.T):
                # Hierarchy nodes that were never active get no file (as the reference); an explicit
                # query always does, silent or not.
                keep = query.level is None or bool(active.any())
                written.append(writer.commit() if keep else writer.discard())
        except BaseException:
            for writer in writers:
                writer.discard()
            raise
        finally:
            if bar is not None:
                bar.close()
    segment_seconds = separator.config.segment_seconds
    hop_seconds = segment_seconds * (1 - separator.config.overlap)
    plot_path = out_dir / "activity.png"
    activity = np.nan_to_num(result.activity, nan=0.0)
    plot_activity(activity, [q.name for q in queries], hop_seconds, plot_path, title=path.name)
    elapsed = time.perf_counter() - t_start
    duration = result.num_samples / rate
    labels = separator.loaded.labels
    manifest = {
        "input": str(path),
        "duration_seconds": duration,
        "sample_rate": rate,
        "model": _model_manifest(separator),
        "separation": {
            "segment_seconds": segment_seconds,
            "overlap": separator.config.overlap,
            "batch_size": separator.config.batch_size,
            "activity_threshold": separator.config.activity_threshold,
            "device": str(separator.device),
            "precision": separator.precision,
            "segments": result.num_segments,
            "segment_start_seconds": [i * hop_seconds for i in range(result.num_segments)],
        },
        "stems": [
            {
                "name": q.name,
                "kind": "example" if q.condition is not None else ("ontology_node" if q.level else "classes"),
                "file": rel if ok else None,
                "class_indexes": list(q.class_indexes) if q.class_indexes else None,
                "class_mids": [labels.mids[i] for i in q.class_indexes] if q.class_indexes else None,
                "level": q.level,
                "mid": q.mid,
                "active_segments": int(result.active_segments[:, i].sum()),
                "activity": [None if np.isnan(v) else round(float(v), 4) for v in result.activity[:, i]],
            }
            for i, (q, rel, ok) in enumerate(zip(queries, stem_paths, written))
        ],
        "activity_plot": "activity.png",
        "timings": {
            "total_seconds": round(elapsed, 3),
            "tagging_seconds": round(result.seconds_tagging, 3),
            "separating_seconds": round(result.seconds_separating, 3),
            "pairs_separated": result.pairs_separated,
            "realtime_factor": round(duration / elapsed, 3) if elapsed > 0 else None,
        },
    }
    tmp = out_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / "manifest.json")
    return manifest


def _model_manifest(separator: Separator) -> dict:
    cfg = separator.model.config
    return {
        "checkpoint": separator.loaded.source,
        "format": separator.loaded.source_format,
        "condition_type": cfg.query_net.condition_type,
        "encoder_channels": list(cfg.separator.encoder_channels),
        "classes": len(separator.loaded.labels),
        "tagger": "separate" if separator.model.tagger is not None else "query net",
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = _collect_inputs(args.inputs)
    labels = LabelSet.from_csv(args.labels_csv) if args.labels_csv else None
    t0 = time.perf_counter()
    # Local paths, s3:// URIs and MLflow model URIs (models:/NAME/VERSION) alike.
    path, downloaded = local_checkpoint(args.checkpoint)
    try:
        loaded = load_model(path, labels, args.tagger_checkpoint, args.metadata_dir)
    finally:
        if downloaded is not None:
            downloaded.cleanup()
    loaded.source = args.checkpoint
    config = SeparationConfig(
        segment_seconds=args.segment_seconds or loaded.model.config.segment_seconds,
        overlap=args.overlap,
        batch_size=args.batch_size,
        activity_threshold=args.activity_threshold,
        device=args.device,
        precision=args.precision,
    )
    separator = Separator(loaded, config)
    queries = build_queries(args, separator, loaded.labels)
    separator.check_queries(queries)
    if not args.quiet:
        print(
            f"model {loaded.source} ({loaded.model.config.query_net.condition_type}, "
            f"{len(loaded.labels)} classes) loaded in {time.perf_counter() - t0:.1f} s; "
            f"{len(queries)} queries, {len(files)} input(s); U-Net on {separator.device} in {separator.precision}",
            file=sys.stderr,
        )
    out_root = Path(args.output_dir)
    for path, out_dir in zip(files, _output_dirs(files, out_root)):
        manifest = separate_file(path, out_dir, separator, queries, args.format, args.quiet)
        stems = [s for s in manifest["stems"] if s["file"]]
        print(
            f"{path} -> {out_dir}: {len(stems)} stem(s), "
            f"{manifest['duration_seconds']:.1f} s of audio in {manifest['timings']['total_seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
