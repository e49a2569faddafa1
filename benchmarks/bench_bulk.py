"""Throughput of bulk separation (the pipeline of ``python -m jobs.separate``) with one actor
and with two, and the scaling efficiency between them.

The corpus is rendered here: ``--files`` clips of ``--seconds`` from the embedded demo corpus's
recipes (GM soundfont instruments and effects, eSpeak NG speech, over background noise; see
:mod:`pipelines.demo_corpus`), as 16-bit FLAC in four sub-folders. The model is a random-weight
separator in the project's checkpoint format: ``--model small`` (default; a ResUNet with
channels 16-192 and the 4-block Cnn14 of the ``tagger-cpu-small`` preset, ``at_soft``
conditions) or ``--model full`` (ResUNet30 + Cnn14, the paper's architecture). Weights do not
change the work done; the activity threshold is 0, so every segment of every query is separated
(no segment is skipped as inactive: the most work a file can take).

Each run is a whole job on a local Ray (``--num-cpus``): list the inputs, plan (model loaded by
the driver), actor pool (each actor ``--cpus-per-actor`` of Ray's CPUs and one torch thread,
model loaded once), FLAC stems to a local output folder, manifest. Two figures per run:

- **end to end**: audio seconds separated / wall seconds of the whole job (start-up included),
  and that per CPU (one CPU per actor: each actor computes on one torch thread);
- **per actor busy**: audio seconds / seconds the actors spent on inputs (decode, tag,
  separate, encode, commit; from the manifest's ``seconds_total``), i.e. without start-up.

Scaling efficiency = throughput with two actors / (2 x throughput with one). Two actors on a
2-core machine share it with Ray's own processes and the driver, so expect less than 1.

Run: ``python -m benchmarks.bench_bulk`` (2.5 minutes on 2 shared cores with the defaults);
``--json PATH`` also writes the figures. The machine should be otherwise idle: other load skews
every figure (the 1-minute load average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

QUERIES = ("Speech", "Piano", "Acoustic guitar")


def build_corpus(folder: Path, files: int, seconds: float, seed: int = 0) -> tuple[float, list]:
    """Render ``files`` demo-corpus clips of ``seconds`` into ``folder`` as FLAC; -> (total
    audio seconds, the demo classes (:class:`pipelines.demo_corpus.DemoClass`))."""
    from pipelines.demo_corpus import DEFAULT_CLASSES, DemoCorpusConfig, encode_flac, render_clip, resolve_demo_classes

    config = DemoCorpusConfig(num_clips=files, clip_seconds=seconds, seed=seed, max_event_seconds=min(6.0, seconds))
    config.validate()
    # AudioSet ids from $USS_METADATA_DIR if set, else the built-in table (the same ids).
    classes = resolve_demo_classes(DEFAULT_CLASSES)
    for i in range(files):
        clip = render_clip(config, classes, i)
        path = folder / f"part{i % 4}" / f"clip{i:03d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_flac(clip.audio, config.sample_rate))
    return files * config.clip_samples / config.sample_rate, classes


def build_model(path: Path, classes: list, size: str) -> Path:
    """A random-weight separator checkpoint (project format) over the demo label set."""
    from uss_core.checkpoints import SeparatorModel, SeparatorModelConfig, save_checkpoint
    from uss_core.models.panns import Cnn14Config
    from uss_core.models.query_nets import QueryNetConfig
    from uss_core.models.resunet import ResUNetConfig
    from uss_core.ontology import LabelSet

    labels = LabelSet(mids=tuple(c.mid for c in classes), names=tuple(c.display_name for c in classes))
    if size == "full":  # ResUNet30 + Cnn14, as in the paper
        tagger = Cnn14Config(classes_num=len(labels))
        channels = ResUNetConfig().encoder_channels
    else:  # the tagger of the tagger-cpu-small preset, a ResUNet of about half the width
        tagger = Cnn14Config(classes_num=len(labels), conv_channels=(16, 32, 64, 128), embedding_size=128)
        channels = (16, 32, 64, 128, 192, 192)
    query = QueryNetConfig(condition_type="at_soft", tagger=tagger)
    separator = ResUNetConfig(condition_size=query.condition_size, encoder_channels=channels)
    torch.manual_seed(0)
    model = SeparatorModel(SeparatorModelConfig(separator=separator, query_net=query))
    parameters = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, labels, path, metadata={"benchmark": f"random weights, {size}", "parameters": parameters})
    return path


def run_job(corpus: Path, output: Path, checkpoint: Path, actors: int, args) -> dict:
    """One bulk job; its figures."""
    from pipelines.bulk_separation import BulkSeparationConfig, QuerySpec, run_bulk_separation

    config = BulkSeparationConfig(
        input=str(corpus),
        output=str(output),
        checkpoint=str(checkpoint),
        queries=QuerySpec(classes=tuple(args.queries)),
        activity_threshold=0.0,
        batch_size=args.batch_size,
        actors=actors,
        cpus_per_actor=args.cpus_per_actor,
        torch_threads=1,
    )
    result = run_bulk_separation(config, job_id=f"bench-{actors}")
    manifest = pq.read_table(output / "manifest.parquet").to_pylist()
    if result.errors or len(manifest) != result.inputs:
        raise RuntimeError(f"the benchmark job had errors: {result.statuses}")
    busy_seconds = sum(r["seconds_total"] for r in manifest)
    return {
        "actors": actors,
        "cpus": result.cpus,
        "inputs": result.inputs,
        "audio_seconds": result.audio_seconds,
        "wall_seconds": result.wall_seconds,
        "audio_seconds_per_second": result.audio_seconds_per_second,
        "audio_seconds_per_second_per_cpu": result.audio_seconds_per_second_per_cpu,
        "actor_busy_seconds": busy_seconds,
        "audio_seconds_per_actor_busy_second": result.audio_seconds / busy_seconds,
        "seconds_separating": sum(r["seconds_separating"] for r in manifest),
        "seconds_tagging": sum(r["seconds_tagging"] for r in manifest),
        "seconds_writing": sum(r["seconds_writing"] for r in manifest),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in manifest),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10, help="clips in the corpus (default %(default)s)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each clip (default %(default)s)")
    p.add_argument("--model", choices=("small", "full"), default="small", help="separator size (default %(default)s)")
    p.add_argument("--queries", nargs="+", default=list(QUERIES), help="demo class names, one stem each")
    p.add_argument("--batch-size", type=int, default=4, help="segment x query pairs per forward (default %(default)s)")
    p.add_argument("--cpus-per-actor", type=float, default=0.5, help="Ray CPUs reserved per actor (default %(default)s)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--workdir", help="where the corpus and outputs go (default: a temporary folder, deleted)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per dataset otherwise
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="uss-bench-bulk-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        audio_seconds, classes = build_corpus(work / "corpus", args.files, args.seconds)
        checkpoint = build_model(work / f"model-{args.model}", classes, args.model)
        print(
            f"corpus: {args.files} clips x {args.seconds:g} s = {audio_seconds:.0f} s of audio, "
            f"model {args.model}, {len(args.queries)} queries ({', '.join(args.queries)}), "
            f"built in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        load_before = os.getloadavg()[0]
        # A fresh local Ray, never a cluster someone else started on this machine.
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            runs = []
            for actors in (1, 2):
                figures = run_job(work / "corpus", work / f"out-{actors}", checkpoint, actors, args)
                runs.append(figures)
                print(
                    f"{actors} actor{'s' if actors > 1 else ' '}: {figures['audio_seconds']:.0f} s of audio in "
                    f"{figures['wall_seconds']:.1f} s = {figures['audio_seconds_per_second']:.2f} audio-s/s end to end, "
                    f"{figures['audio_seconds_per_second_per_cpu']:.2f} per CPU; "
                    f"{figures['audio_seconds_per_actor_busy_second']:.2f} audio-s per actor-busy second",
                    flush=True,
                )
            ncpus = int(ray.cluster_resources().get("CPU", 0))
        finally:
            ray.shutdown()
        load_after = os.getloadavg()[0]
    one, two = runs
    efficiency = two["audio_seconds_per_second"] / (2 * one["audio_seconds_per_second"])
    busy_efficiency = two["audio_seconds_per_actor_busy_second"] / one["audio_seconds_per_actor_busy_second"]
    print(
        f"scaling 1 -> 2 actors: x{two['audio_seconds_per_second'] / one['audio_seconds_per_second']:.2f} end to end, "
        f"efficiency {efficiency:.0%}; per actor-busy second {busy_efficiency:.0%} of one actor's rate\n"
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Ray with {ncpus} CPUs, "
        f"torch {torch.__version__}; 1-min load average {load_before:.2f} before, {load_after:.2f} after"
    )
    if args.json:
        document = {
            "model": args.model,
            "files": args.files,
            "seconds": args.seconds,
            "queries": args.queries,
            "runs": runs,
            "scaling_efficiency": efficiency,
            "busy_scaling_efficiency": busy_efficiency,
            "cores": os.cpu_count(),
            "load_average": [load_before, load_after],
        }
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
