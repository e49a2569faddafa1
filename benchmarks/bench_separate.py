"""Speed of ``uss separate`` against the reference inference path, and peak memory on a long file.

Same weights (random, official checkpoint format), same 30-s input, same machine. The two are run
alternately ``--rounds`` times (timings on a shared machine drift) and the ratio of medians printed:

- three class queries: the reference run three times with one class id each (its class-id path
  writes a single stem per run), against one ``uss separate`` with three ``--class-id``;
- hierarchical level 1: the reference's ``separate_by_hierarchy(levels=[1])`` against
  ``uss separate --levels 1``.

Our side runs with the reference's chunking (2-s segments, no overlap) so both do the same
separation work, in fp32 (the reference's numbers) and, where the CPU has AMX, with
``--precision bf16`` too (with the SNR of its stems against the fp32 ones), the row marked
``= default`` being what ``uss separate`` runs here by default; ``--also-defaults``
adds a row with our default overlap. Model loading is
excluded on both sides (printed separately). Peak memory: ``uss separate`` on a generated
``--memory-minutes`` long file in a subprocess (default precision), its peak resident memory
(``VmHWM``, Linux).

Run: ``python -m benchmarks.bench_separate --metadata-dir ../shared/audioset``
(needs the ``reference`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from benchmarks.reference_harness import import_reference, load_reference_models, write_reference_checkpoints
from uss_core.separation import (
    SeparationConfig, Separator, class_queries, hierarchy_queries, cpu_has_amx_bf16, resolve_precision,
)

CLASS_IDS = [0, 137, 300]  # Speech, Music, Vehicle
# bf16 is only faster with AMX (uss_core.separation.cpu_has_amx_bf16); elsewhere it is slower than fp32.
DEFAULT_PRECISIONS = ["fp32", "bf16"] if cpu_has_amx_bf16() else ["fp32"]


def make_input(path: Path, seconds: float, seed: int = 0) -> None:
    """A test recording: tones, bursts and noise (content does not matter with random weights)."""
    rate = 32000
    rng = np.random.default_rng(seed)
    with soundfile.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for start in range(0, int(seconds * rate), 60 * rate):
            n = min(60 * rate, int(seconds * rate) - start)
            t = (start + np.arange(n)) / rate
            block = 0.2 * np.sin(2 * np.pi * 330 * t) * (t % 3 < 1) + 0.05 * rng.standard_normal(n)
            f.write(block.astype(np.float32))


def time_reference_classes(ref, lit, tagger, audio_path: Path, out: Path) -> float:
    import librosa

    t0 = time.perf_counter()
    for class_id in CLASS_IDS:  # the reference writes one stem per run: three runs
        audio, _ = librosa.load(audio_path, sr=32000, mono=True)
        ref.inference.separate_by_class_ids(audio, 32000, 64000, tagger, lit, "cpu", [class_id], str(out))
    return time.perf_counter() - t0


def time_reference_hierarchy(ref, lit, tagger, audio_path: Path, out: Path, ontology: Path) -> float:
    import librosa

    t0 = time.perf_counter()
    audio, _ = librosa.load(audio_path, sr=32000, mono=True)
    ref.inference.separate_by_hierarchy(audio, 32000, 64000, tagger, lit, "cpu", [1], str(ontology), 1e-6, str(out))
    return time.perf_counter() - t0


def time_ours(separator, audio_path: Path, out: Path, queries) -> float:
    from jobs.separate_files import separate_file

    t0 = time.perf_counter()
    separate_file(audio_path, out, separator, queries, "wav", quiet=True)
    return time.perf_counter() - t0


def time_unet_pair(forward, repeats: int = 5) -> float:
    """Median seconds of ``forward()``: one U-Net pass over one 2-s segment and condition."""
    with torch.inference_mode():
        forward()  # warm-up: oneDNN primitives, the fused path's prepared weights
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stems_snr_db(reference_dir: Path, other_dir: Path) -> float:
    """SNR (dB) of every stem under ``other_dir`` against the same-named stem under ``reference_dir``."""
    signal = error = 0.0
    for path in sorted(reference_dir.rglob("*.wav")):
        a, _ = soundfile.read(path, dtype="float64")
        b, _ = soundfile.read(other_dir / path.relative_to(reference_dir), dtype="float64")
        signal += float(np.sum(a**2))
        error += float(np.sum((a - b) ** 2))
    return 10 * np.log10(signal / error) if error > 0 else float("inf")


def peak_memory_gb(checkpoint: Path, tagger: Path, audio_path: Path, out: Path, metadata_dir: Path) -> tuple[float, float]:
    """Peak RSS (GB, 10^9 bytes) and wall seconds of ``uss separate`` in a child process.

    The peak is the child's own ``VmHWM`` (Linux), polled until it exits. ``getrusage`` would not
    do: a forked child's ``ru_maxrss`` starts at the parent's resident size at fork time, and
    this process holds both models (over 3 GB), which is what an earlier version reported.
    """
    cmd = [
        sys.executable, "-m", "jobs.cli", "separate", str(audio_path), "-o", str(out), "--checkpoint", str(checkpoint),
        "--tagger-checkpoint", str(tagger), "--metadata-dir", str(metadata_dir), "--class-id", "0", "--quiet",
        "--overlap", "0",
    ]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    peak_kib = 0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:  # exited between poll() and the read
            break
        peak_kib = max([peak_kib] + [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")])
        time.sleep(0.2)
    if child.wait():
        raise subprocess.CalledProcessError(child.returncode, cmd)
    return peak_kib * 1024 / 1e9, time.perf_counter() - t0


def chunked_label(precision: str) -> str:
    """Name of our run with the reference's chunking at ``precision`` (marked if it is the default
    here, what ``--precision auto`` resolves to on this CPU)."""
    default = resolve_precision("auto", torch.device("cpu"))
    return f"2s/no overlap, {precision}{' = default' if precision == default else ''}"


def time_against_reference(args, ref, uss_path: Path, tagger_path: Path, work: Path) -> dict:
    """Both cases, ``args.rounds`` alternating rounds each; returns the figures (also printed)."""
    from uss_core.checkpoints import load_model
    from uss_core.ontology import load_label_set, load_ontology

    audio_path = work / "input.wav"
    make_input(audio_path, args.seconds)

    t0 = time.perf_counter()
    lit, tagger = load_reference_models(ref, uss_path, tagger_path)
    ref_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_model(uss_path, load_label_set(args.metadata_dir), tagger_path)
    our_load = time.perf_counter() - t0
    labels, ontology = loaded.labels, load_ontology(args.metadata_dir)
    separators = {
        chunked_label(precision): Separator(
            loaded, SeparationConfig(segment_seconds=2.0, overlap=0.0, device="cpu", precision=precision)
        )
        for precision in args.precision
    }
    if args.also_defaults:
        separators["default overlap, fp32"] = Separator(loaded, SeparationConfig(device="cpu"))
    cases = {
        "3 class queries": (
            lambda out: time_reference_classes(ref, lit, tagger, audio_path, out),
            class_queries(labels, CLASS_IDS),
        ),
        "hierarchy level 1": (
            lambda out: time_reference_hierarchy(ref, lit, tagger, audio_path, out, args.metadata_dir / "ontology.json"),
            hierarchy_queries(ontology, labels, [1]),
        ),
    }
    results = {"input_seconds": args.seconds, "load_seconds": {"reference": ref_load, "ours": our_load}}
    print(f"model load: reference {ref_load:.2f} s, ours {our_load:.2f} s")
    # The U-Net alone (fp32, one segment x condition pair): what both sides spend nearly all their time on.
    segment, condition = 0.1 * torch.randn(1, 1, 64000), torch.rand(1, len(labels))
    net = loaded.model.ss_model
    unet = {
        "reference": time_unet_pair(lambda: lit.ss_model(input_dict={"mixture": segment, "condition": condition})),
        "ours": time_unet_pair(lambda: net(segment, condition)),
    }
    print(f"U-Net, one 2-s segment x condition pair, fp32: reference {unet['reference']:.3f} s, ours {unet['ours']:.3f} s")
    if "bf16" in args.precision:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unet["ours_bf16"] = time_unet_pair(lambda: net(segment, condition))
            # What ResUNet.forward replaces with its fused bf16 path: autocast op by op.
            unet["ours_bf16_op_by_op"] = time_unet_pair(lambda: net.base(segment, net.film(condition)))
        print(f"U-Net pair, bf16: ours {unet['ours_bf16']:.3f} s (op-by-op autocast: {unet['ours_bf16_op_by_op']:.3f} s)")
    results["unet_seconds_per_pair"] = unet
    cwd = os.getcwd()
    os.chdir(work)  # the reference's hierarchy path writes plots into the working directory
    try:
        for case, (run_reference, queries) in cases.items():
            ref_times, our_times = [], {label: [] for label in separators}
            outputs = {label: work / f"ours-{case}-{n}" for n, label in enumerate(separators)}
            for r in range(args.rounds):
                ref_times.append(run_reference(work / f"ref-{r}"))
                for label, separator in separators.items():
                    our_times[label].append(time_ours(separator, audio_path, outputs[label], queries))
            for label, times in our_times.items():
                ratio = statistics.median(ref_times) / statistics.median(times)
                results[f"{case} ({label})"] = {"reference_s": ref_times, "ours_s": times, "speedup": ratio}
                print(
                    f"{case:<18} ({label}): reference {statistics.median(ref_times):6.1f} s, "
                    f"ours {statistics.median(times):6.1f} s -> {ratio:.2f}x faster"
                )
            if {"fp32", "bf16"} <= set(args.precision):
                snr = stems_snr_db(outputs[chunked_label("fp32")], outputs[chunked_label("bf16")])
                results[f"{case} bf16 vs fp32 snr_db"] = snr
                print(f"{case:<18} bf16 stems against fp32 stems: {snr:.1f} dB SNR")
    finally:
        os.chdir(cwd)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metadata-dir", type=Path, required=True, help="folder with AudioSet metadata")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (0: peak memory only)")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--memory-minutes", type=float, default=60.0, help="length of the peak-memory input (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=DEFAULT_PRECISIONS,
                   help="our U-Net precisions to time (default: fp32, and bf16 where the CPU has AMX)")
    p.add_argument("--also-defaults", action="store_true", help="also time our default overlap")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    args.metadata_dir = args.metadata_dir.resolve()  # we chdir below
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench_separate_"))
    ref = import_reference(work / "home", args.metadata_dir)
    uss_path, tagger_path = write_reference_checkpoints(ref, work / "ckpt")
    results = {"threads": args.threads}
    if args.rounds > 0:
        results.update(time_against_reference(args, ref, uss_path, tagger_path, work))
    if args.memory_minutes > 0:
        long_path = work / "long.flac"
        make_input(long_path, args.memory_minutes * 60)
        peak, wall = peak_memory_gb(uss_path, tagger_path, long_path, work / "long-out", args.metadata_dir)
        results["peak_memory"] = {"minutes": args.memory_minutes, "peak_rss_gb": peak, "wall_seconds": wall}
        precision = resolve_precision("auto", torch.device("cpu"))
        results["peak_memory"]["precision"] = precision
        print(f"peak memory, {args.memory_minutes:g}-min input, {precision}: {peak:.2f} GB (ran {wall:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
