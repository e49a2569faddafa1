"""Seconds per training step of the CPU presets, in fp32 and in bfloat16 autocast.

One worker's step as the training loops run it (forward, loss, backward, optimizer step), on
random inputs of the preset's shapes, in this process:

- tagger (``tagger-cpu-small``): a Cnn14_DecisionLevelMax on a worker's batch of 10-s clips
  (``batch_size / num_workers``), binary cross-entropy, Adam; the log-mel front end in fp32 either way;
- separator (``separator-cpu-small``): the ResUNet on a batch of ``crop_samples`` crops with a
  one-hot condition, L1 on the waveform, AdamW.

Threads as the preset gives each worker (``torch_threads``, else one per reserved CPU). bf16 is
only timed where the CPU has AMX (the only CPUs where it is faster, and where training uses it). The machine should be
otherwise idle. Run: ``python -m benchmarks.bench_training_step [--steps 8] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Callable

import torch

from jobs.common import preset_path
from pipelines.separator_training import SeparatorTrainingConfig, separation_loss
from pipelines.tagger_training import TaggerTrainingConfig
from pipelines.training_common import bf16_autocast, worker_threads
from uss_core.config import load_yaml
from uss_core.models.panns import Cnn14DecisionLevelMax
from uss_core.models.resunet import ResUNet

CLASSES = 24  # the demo corpus's label set
CLIP_SAMPLES = 320000  # 10 s at 32 kHz


def tagger_step(preset: str) -> tuple[Callable[[bool], None], dict]:
    """A training step of the tagger preset, and what it runs on."""
    config = load_yaml(TaggerTrainingConfig, preset_path(preset, "tagger"))
    model_config = dataclasses.replace(config.model, classes_num=CLASSES, head=config.head)
    net = Cnn14DecisionLevelMax(model_config).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    batch = config.worker_batch_size
    waveform = 0.1 * torch.randn(batch, CLIP_SAMPLES)
    target = (torch.rand(batch, CLASSES) < 0.1).float()

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            probabilities = net(waveform)["clipwise_output"]
        loss = torch.nn.functional.binary_cross_entropy(probabilities.float().clamp(1e-7, 1 - 1e-7), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, {"batch": batch, "threads": worker_threads(config.torch_threads, config.cpus_per_worker)}


def separator_step(preset: str) -> tuple[Callable[[bool], None], dict]:
    """A training step of the separator preset (one-hot condition), and what it runs on."""
    config = load_yaml(SeparatorTrainingConfig, preset_path(preset, "separator"))
    net = ResUNet(dataclasses.replace(config.separator, condition_size=CLASSES)).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, amsgrad=True)
    batch = config.batch_size // config.num_workers
    samples = config.crop_samples or config.segment_samples
    mixture = 0.1 * torch.randn(batch, 1, samples)
    target = 0.5 * mixture[:, 0]
    condition = torch.nn.functional.one_hot(torch.arange(batch) % CLASSES, CLASSES).float()

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            estimate = net(mixture, condition)[:, 0]
            loss = separation_loss(estimate.float(), target, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, {"batch": batch, "samples": samples, "threads": worker_threads(config.torch_threads, config.cpus_per_worker)}


def time_steps(step: Callable[[bool], None], bf16: bool, steps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` timed steps, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(bf16)
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(bf16)
        seconds.append(time.perf_counter() - t0)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_training_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--tagger-preset", default="tagger-cpu-small")
    p.add_argument("--separator-preset", default="separator-cpu-small")
    p.add_argument("--steps", type=int, default=8, help="timed steps per model and precision")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    precisions = [False, True] if bf16_autocast(torch.device("cpu"), False, cpu_bf16=True) else [False]
    figures = []
    for name, preset, build in (("tagger", args.tagger_preset, tagger_step), ("separator", args.separator_preset, separator_step)):
        step, shape = build(preset)
        torch.set_num_threads(shape["threads"])
        for bf16 in precisions:
            seconds = statistics.median(time_steps(step, bf16, args.steps))
            row = {"model": name, "preset": preset, "precision": "bf16" if bf16 else "fp32", "seconds_per_step": round(seconds, 4), **shape}
            figures.append(row)
            print(f"{name:9s} {preset:22s} {row['precision']}: {seconds:.3f} s/step "
                  f"(batch {shape['batch']}, {shape['threads']} thread(s))", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
