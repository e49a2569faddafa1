"""Throughput of the data pipeline on the demo corpus: ingest -> mine anchors -> mix.

Two figures for mining:

- **model throughput per CPU**: :class:`pipelines.anchors.AnchorMiner` called in this process
  with one torch thread on batches of decoded clips (SED on 10-s clips + condition tagger on
  each anchor; no Ray, no I/O): clips per second on one CPU;
- **stage throughput**: the Ray Data stage (Parquet read, actor pool, Parquet write) over the
  whole corpus: clips per second, and per CPU of the local Ray (``--num-cpus``, default all).

And the whole pipeline: ingest (decode the WebDataset shards), mine, mix, each timed, and clips
per second end to end. Printed; ``--json`` writes the same numbers.

Run (after ``python -m jobs.corpus demo --out /tmp/demo400`` and tagger training)::

    python -m benchmarks.bench_pipeline --corpus /tmp/demo400 --sed-tagger /tmp/demo400/tagger-sed

``--random-taggers`` uses random-weight taggers (full-size Cnn14 on the corpus's label set)
when no trained one exists: the timings hold (the work does not depend on the weights), the
anchors are meaningless. The machine should be otherwise idle: other load skews every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def _random_taggers(folder: Path, labels) -> tuple[str, str]:
    from uss_core.checkpoints import save_tagger_checkpoint
    from uss_core.models.panns import Cnn14, Cnn14Config

    torch.manual_seed(0)
    path = folder / "random-tagger"
    save_tagger_checkpoint(Cnn14(Cnn14Config(classes_num=len(labels))), labels, path)
    return str(path), str(path)


def bench_miner_in_process(clips_uri: str, config, batches: int) -> dict:
    """Clips/s of AnchorMiner on one torch thread (first batch is a warm-up, not counted)."""
    import dataclasses

    from pipelines.anchors import AnchorMiner
    from pipelines.schemas import CLIP_SCHEMA, read_table

    config = dataclasses.replace(config, torch_threads=1)
    miner = AnchorMiner(config)
    clips = read_table(clips_uri, schema=CLIP_SCHEMA)
    n = config.batch_size
    miner(clips.slice(0, n))
    t0 = time.perf_counter()
    done = 0
    for b in range(1, batches + 1):
        batch = clips.slice(b * n, n)
        if batch.num_rows == 0:
            break
        miner(batch)
        done += batch.num_rows
    seconds = time.perf_counter() - t0
    return {"clips": done, "seconds": seconds, "clips_per_second_per_cpu": done / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="demo corpus folder (shards/, labels.csv)")
    p.add_argument("--sed-tagger", help="SED tagger checkpoint")
    p.add_argument("--condition-tagger", help="condition tagger checkpoint (default: the SED one)")
    p.add_argument("--random-taggers", action="store_true", help="random-weight full-size Cnn14 taggers")
    p.add_argument("--workdir", help="where the datasets go (default: a temporary folder, deleted)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--miner-batches", type=int, default=4, help="batches timed in process (default %(default)s)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    import ray

    from pipelines.anchors import MiningConfig, mine_anchors
    from pipelines.mixing import MixingConfig, mix_anchors
    from pipelines.sources import ClipSourceConfig, write_clips
    from uss_core.ontology import LabelSet

    corpus = Path(args.corpus)
    labels = LabelSet.from_csv(corpus / "labels.csv")
    tmp = tempfile.TemporaryDirectory(prefix="bench-pipeline-") if not args.workdir else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if args.random_taggers:
        sed, cond = _random_taggers(work, labels)
    elif args.sed_tagger:
        sed, cond = args.sed_tagger, args.condition_tagger or args.sed_tagger
    else:
        p.error("give --sed-tagger (and --condition-tagger) or --random-taggers")

    num_cpus = args.num_cpus or os.cpu_count()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "ray_cpus": num_cpus, "processor": platform.processor(), "torch": torch.__version__},
        "taggers": {"sed": sed, "condition": cond, "random": bool(args.random_taggers)},
    }
    try:
        t0 = time.perf_counter()
        ingest = write_clips(
            ClipSourceConfig(format="webdataset", uris=(str(corpus / "shards"),), num_cpus=1.0),
            labels,
            str(work / "clips"),
            str(work / "clips-errors"),
        )
        t_ingest = time.perf_counter() - t0
        config = MiningConfig(
            sed, cond, batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
            torch_threads=args.torch_threads,
        )
        mined = mine_anchors(str(work / "clips"), str(work / "anchors"), config)
        t0 = time.perf_counter()
        mixed = mix_anchors(str(work / "anchors"), str(work / "mixtures"), MixingConfig(seed=0))
        t_mix = time.perf_counter() - t0
        total = t_ingest + mined.seconds + t_mix
        results["ingest"] = {"clips": ingest.num_clips, "errors": ingest.num_errors, "seconds": t_ingest,
                             "clips_per_second": ingest.num_clips / t_ingest}
        results["mine"] = {"clips": mined.num_clips, "anchors": mined.num_anchors, "seconds": mined.seconds,
                           "clips_per_second": mined.clips_per_second,
                           "clips_per_second_per_ray_cpu": mined.clips_per_second / num_cpus,
                           "actors": args.actors, "cpus_per_actor": args.cpus_per_actor, "torch_threads": args.torch_threads}
        results["mix"] = {"anchors": mixed.num_anchors, "mixtures": mixed.num_mixtures, "seconds": t_mix,
                          "mixtures_per_second": mixed.num_mixtures / t_mix}
        results["pipeline"] = {"clips": ingest.num_clips, "seconds": total, "clips_per_second": ingest.num_clips / total,
                               "clips_per_second_per_ray_cpu": ingest.num_clips / total / num_cpus}
    finally:
        ray.shutdown()
    results["miner_in_process"] = bench_miner_in_process(str(work / "clips"), config, args.miner_batches)
    if tmp is not None:
        tmp.cleanup()

    m = results["miner_in_process"]
    print(f"machine: {num_cpus} Ray CPUs ({os.cpu_count()} cores), torch {torch.__version__}")
    print(f"ingest : {results['ingest']['clips']} clips in {t_ingest:.1f} s ({results['ingest']['clips_per_second']:.1f} clips/s)")
    print(f"mine   : {mined.num_clips} clips -> {mined.num_anchors} anchors in {mined.seconds:.1f} s "
          f"({mined.clips_per_second:.2f} clips/s, {mined.clips_per_second / num_cpus:.2f} per Ray CPU)")
    print(f"  model: {m['clips_per_second_per_cpu']:.2f} clips/s on one CPU (AnchorMiner in process, {m['clips']} clips)")
    print(f"mix    : {mixed.num_anchors} anchors -> {mixed.num_mixtures} mixtures in {t_mix:.1f} s")
    print(f"total  : {total:.1f} s, {ingest.num_clips / total:.2f} clips/s end to end "
          f"({ingest.num_clips / total / num_cpus:.2f} per Ray CPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
