"""Driving the reference implementation (``uss`` 0.0.4, ``panns-inference`` 0.1.1) offline.

Used by the compatibility tests and the speed benchmark. Importing ``uss.config`` or
``panns_inference`` runs ``wget`` for the AudioSet metadata unless it is already where they look
(``~/.cache/uss/metadata/``, ``~/panns_data/``), so :func:`import_reference` points HOME at a
folder that holds it for the duration of the import.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import torch

PANNS_KWARGS = dict(sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000, classes_num=527)


def import_reference(home: Path, audioset_dir: Path) -> types.SimpleNamespace:
    """Import the reference modules with ``home`` prepared as their HOME."""
    for sub in (".cache/uss/metadata", "panns_data"):
        (home / sub).mkdir(parents=True, exist_ok=True)
        for name in ("class_labels_indices.csv", "ontology.json"):
            (home / sub / name).write_bytes((Path(audioset_dir) / name).read_bytes())
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        import panns_inference.models as panns
        import uss.inference as inference
        import uss.models.pl_modules as pl
        import uss.models.query_nets as query_nets
        import uss.models.resunet as resunet
    finally:
        if old_home is not None:
            os.environ["HOME"] = old_home
    return types.SimpleNamespace(panns=panns, inference=inference, pl=pl, query_nets=query_nets, resunet=resunet)


def randomize_batchnorm(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so eval-mode batch norm is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


def reference_lit_model(ref, seed: int = 0):
    """A reference LitSeparation (ResUNet30 + at_soft Cnn14 query net) with random weights, eval mode."""
    torch.manual_seed(seed)
    ss_model = ref.resunet.ResUNet30(input_channels=1, output_channels=1, condition_size=527)
    query_net = ref.query_nets.Cnn14_Wrapper(bottleneck_type="at_soft", base_checkpoint_path="", freeze_base=True)
    lit = ref.pl.LitSeparation(
        ss_model=ss_model, anchor_segment_detector=None, anchor_segment_mixer=None, query_net=query_net,
        loss_function=None, optimizer_type=None, learning_rate=None, lr_lambda_func=None,
    )
    randomize_batchnorm(lit, seed)
    return lit.eval()


def reference_tagger(ref, seed: int = 0):
    """A reference PANNs Cnn14 with random weights, eval mode."""
    torch.manual_seed(seed)
    tagger = ref.panns.Cnn14(**PANNS_KWARGS)
    randomize_batchnorm(tagger, seed)
    return tagger.eval()


def write_reference_checkpoints(ref, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Official-format files with random weights: ``uss.ckpt`` (Lightning ``state_dict``) and
    ``tagger.pth`` (PANNs ``{"model": ...}``). Returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    uss_path, tagger_path = root / "uss.ckpt", root / "tagger.pth"
    torch.save({"epoch": 0, "global_step": 0, "state_dict": reference_lit_model(ref, seed).state_dict()}, uss_path)
    torch.save({"model": reference_tagger(ref, seed + 1).state_dict()}, tagger_path)
    return uss_path, tagger_path


def load_reference_models(ref, uss_path: Path, tagger_path: Path):
    """The reference's separation model and activity tagger, loaded from the files above."""
    lit = reference_lit_model(ref)
    lit.load_state_dict(torch.load(uss_path, weights_only=True)["state_dict"])
    tagger = ref.panns.Cnn14(**PANNS_KWARGS)
    tagger.load_state_dict(torch.load(tagger_path, weights_only=True)["model"])
    return lit.eval(), tagger.eval()
