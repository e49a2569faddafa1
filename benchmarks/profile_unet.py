"""Where the CPU inference of ResUNet30 spends its time: one segment x condition pair.

Random weights in eval mode (the fused CPU path of ``uss_core.models.resunet``; with
``--precision bf16`` under bfloat16 autocast, as ``uss separate`` runs it), a 2-s segment,
``--threads`` torch threads: ``--passes`` timed forwards after a warm-up, then ``torch.profiler``
over as many more. Prints the seconds per pair and each operator's share of the self CPU time, grouped as convolutions
(oneDNN direct, Winograd products and transforms, 1x1 / transposed convolutions as matrix
products) and memory-bound passes. Run: ``python -m benchmarks.profile_unet [--precision bf16]``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from uss_core.models.resunet import ResUNet, ResUNetConfig

# Operator -> group. The fused path's convolutions are oneDNN calls (direct), batched matrix
# products plus plain ones (Winograd: transforms are ``mm``), and ``addmm`` (1x1 convolutions and
# the transposed upsampling written as matrix products); everything else streams activations.
GROUPS = {
    "mkldnn::_convolution_pointwise": "convolution: oneDNN direct",
    "aten::mkldnn_convolution": "convolution: oneDNN direct",
    "aten::bmm": "convolution: Winograd",
    "aten::mm": "convolution: Winograd",
    "aten::addmm": "convolution: 1x1 and transposed as matmul",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_unet", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--top", type=int, default=10, help="operators listed")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = ResUNet(ResUNetConfig()).eval()
    segment, condition = 0.1 * torch.randn(1, 1, 64000), torch.rand(1, 527)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with torch.inference_mode(), autocast:
        net(segment, condition)  # warm-up: prepared weights, oneDNN primitives
        t0 = time.perf_counter()
        for _ in range(args.passes):
            net(segment, condition)
        seconds = (time.perf_counter() - t0) / args.passes  # timed without the profiler's overhead
        with torch.profiler.profile() as prof:
            for _ in range(args.passes):
                net(segment, condition)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    groups: dict[str, float] = defaultdict(float)
    for e in ops:
        groups[GROUPS.get(e.key, "memory-bound and other")] += e.self_cpu_time_total / total
    print(f"ResUNet30, one 2-s pair, {args.precision}, {args.threads} threads: {seconds:.3f} s per pair")
    for name, share in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:45s} {100 * share:5.1f}%")
    print("top operators (share of self CPU time):")
    for e in ops[: args.top]:
        print(f"  {e.key:45s} {100 * e.self_cpu_time_total / total:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
