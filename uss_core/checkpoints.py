"""Checkpoints: the project's own format, and import of the official USS and PANNs checkpoints.

Own format: a directory holding ``config.json`` (architecture, condition type, label set, sample
rate) and ``model.safetensors`` (weights). It says how to rebuild the model, so loading needs
nothing else. Written atomically (a temporary directory, then a rename).

Imports, never unpickling code (``torch.load(weights_only=True)``):

- the official USS Lightning checkpoint (``state_dict`` with ``ss_model.*`` and ``query_net.*``):
  the architecture and condition type are read off the weight shapes;
- PANNs checkpoints (``{"model": state_dict}``) for Cnn14 / Cnn14_DecisionLevelMax.

The reference keeps its STFT as convolutions with stored DFT matrices; we drop those keys on
import after checking they hold the standard matrices, and add them back in
:func:`reference_state_dict`, so weights travel both ways.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from uss_core.config import from_dict, to_dict
from uss_core.errors import CheckpointError, ConfigError
from uss_core.models.frontend import reference_frontend_constants
from uss_core.models.panns import Cnn14, Cnn14Config, Cnn14DecisionLevelMax
from uss_core.models.query_nets import QueryNet, QueryNetConfig
from uss_core.models.resunet import ResUNet, ResUNetConfig
from uss_core.ontology import LabelSet

FORMAT_NAME = "uss-at-scale/separator"
TAGGER_FORMAT_NAME = "uss-at-scale/tagger"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class SeparatorModelConfig:
    """Everything needed to rebuild a separation model (weights aside)."""

    separator: ResUNetConfig = field(default_factory=ResUNetConfig)
    query_net: QueryNetConfig = field(default_factory=QueryNetConfig)
    # A separate clip-level tagger for segment activity; None: use the query net's own tagger.
    tagger: Cnn14Config | None = None
    sample_rate: int = 32000
    segment_seconds: float = 2.0  # the training segment length

    def __post_init__(self) -> None:
        if self.separator.condition_size != self.query_net.condition_size:
            raise ConfigError(
                f"separator condition_size {self.separator.condition_size} does not match the query net's "
                f"condition size {self.query_net.condition_size} ({self.query_net.condition_type})"
            )


class SeparatorModel(nn.Module):
    """Separator, query net and optional tagger, under the reference's prefixes
    (``ss_model.*``, ``query_net.*``; ours add ``tagger.*``)."""

    def __init__(self, config: SeparatorModelConfig) -> None:
        super().__init__()
        self.config = config
        self.ss_model = ResUNet(config.separator)
        self.query_net = QueryNet(config.query_net)
        self.tagger = Cnn14(config.tagger) if config.tagger is not None else None
        if self.tagger is not None:
            self.tagger.requires_grad_(False)

    def activity_tagger(self) -> Cnn14 | None:
        """The clip-level tagger whose probabilities gate segments: the separate tagger if any,
        else the query net's Cnn14 base (None for a ``hard`` model without a tagger)."""
        return self.tagger if self.tagger is not None else self.query_net.base


@dataclass
class LoadedModel:
    """A model ready for inference, with its label set and where it came from."""

    model: SeparatorModel
    labels: LabelSet
    source: str
    source_format: str  # "uss-at-scale", "uss-official"


# ---------------------------------------------------------------------------------------------
# Own format


def _write_checkpoint_dir(path: str | Path, document: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``path`` atomically (a temporary
    sibling directory renamed into place; an existing checkpoint there is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_checkpoint(model: SeparatorModel, labels: LabelSet, path: str | Path, metadata: dict | None = None) -> Path:
    """Write a separation model to the checkpoint directory ``path``."""
    if len(labels) != model.config.query_net.tagger.classes_num:
        raise ConfigError(
            f"label set has {len(labels)} classes but the model predicts {model.config.query_net.tagger.classes_num}"
        )
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": to_dict(model.config),
        "labels": labels.to_records(),
        "metadata": metadata or {},
    }
    return _write_checkpoint_dir(path, document, model.state_dict())


def save_tagger_checkpoint(tagger: Cnn14, labels: LabelSet, path: str | Path, metadata: dict | None = None) -> Path:
    """Write a Cnn14-family tagger (either head: both share one state-dict layout) to ``path``."""
    if len(labels) != tagger.config.classes_num:
        raise ConfigError(f"label set has {len(labels)} classes but the tagger predicts {tagger.config.classes_num}")
    document = {
        "format": TAGGER_FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": to_dict(tagger.config),
        "labels": labels.to_records(),
        "metadata": metadata or {},
    }
    return _write_checkpoint_dir(path, document, tagger.state_dict())


def load_tagger(path: str | Path, sound_event_detection: bool = False) -> tuple[Cnn14 | Cnn14DecisionLevelMax, LabelSet | None]:
    """A tagger from an own-format tagger directory or a PANNs ``.pth`` file.

    Returns the model (:class:`Cnn14DecisionLevelMax` if ``sound_event_detection``) and its label
    set (None for PANNs files, which carry none: they use the 527 AudioSet classes).
    """
    path = Path(path)
    cls = Cnn14DecisionLevelMax if sound_event_detection else Cnn14
    if not path.is_dir():
        return load_panns(path, sound_event_detection), None
    document = read_checkpoint_document(path, TAGGER_FORMAT_NAME)
    fields = dict(document["model"])
    # Taggers saved before the config named its head kept it in the training metadata.
    fields.setdefault("head", document.get("metadata", {}).get("head", "clip"))
    model = cls(from_dict(Cnn14Config, fields, where=f"{path}/{CONFIG_FILE}"))
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:
        raise CheckpointError(f"{path}/{WEIGHTS_FILE}: cannot read weights ({exc})") from None
    _load_state(model, state, str(path))
    return model.eval(), LabelSet.from_records(document["labels"])


def read_checkpoint_document(path: str | Path, expected_format: str = FORMAT_NAME) -> dict:
    """The parsed ``config.json`` of an own-format checkpoint directory."""
    config_path = Path(path) / CONFIG_FILE
    try:
        document = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; is this a uss-at-scale checkpoint directory?") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
    if document.get("format") != expected_format:
        raise CheckpointError(f"{config_path}: not a {expected_format} checkpoint (format={document.get('format')!r})")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format version {document['format_version']} is newer than this release "
            f"understands ({FORMAT_VERSION}); upgrade uss-at-scale"
        )
    return document


def _load_own(path: Path) -> LoadedModel:
    document = read_checkpoint_document(path)
    config = from_dict(SeparatorModelConfig, document["model"], where=f"{path}/{CONFIG_FILE}")
    labels = LabelSet.from_records(document["labels"])
    model = SeparatorModel(config)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}/{WEIGHTS_FILE}: cannot read weights ({exc})") from None
    _load_state(model, state, str(path))
    return LoadedModel(model.eval(), labels, str(path), "uss-at-scale")


def _load_state(module: nn.Module, state: dict, source: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: weights do not match the model "
            f"(missing {len(result.missing_keys)}: {result.missing_keys[:3]}; "
            f"unexpected {len(result.unexpected_keys)}: {result.unexpected_keys[:3]})"
        )


# ---------------------------------------------------------------------------------------------
# Reference checkpoints


_SAFE_GLOBALS = [Path, type(Path())]


def _torch_load(path: Path) -> dict:
    """``torch.load`` that refuses to run code from the file."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot load as a weights-only PyTorch checkpoint ({str(exc).splitlines()[0]}). "
            "Checkpoints that need code to unpickle are refused."
        ) from None


def _drop_reference_constants(state: dict, prefix: str, kind: str, n_fft: int, source: str) -> None:
    """Remove torchlibrosa's stored DFT matrices after checking they are the standard ones."""
    for key, expected in reference_frontend_constants(prefix, kind, n_fft).items():
        if key not in state:
            continue
        found = state.pop(key)
        if found.shape != expected.shape or not torch.allclose(found.float(), expected, atol=1e-4):
            raise CheckpointError(
                f"{source}: {key} is not the standard {kind.upper()} matrix (fine-tuned front end?); "
                "this implementation computes the transform with an FFT and cannot use custom matrices"
            )


def _cnn14_config_from_state(state: dict, prefix: str) -> Cnn14Config:
    channels = []
    i = 1
    while f"{prefix}conv_block{i}.conv1.weight" in state:
        channels.append(state[f"{prefix}conv_block{i}.conv1.weight"].shape[0])
        i += 1
    if not channels:
        raise CheckpointError(f"no Cnn14 conv blocks under '{prefix}'")
    mel = state[f"{prefix}logmel_extractor.melW"]
    return Cnn14Config(
        classes_num=state[f"{prefix}fc_audioset.weight"].shape[0],
        conv_channels=tuple(channels),
        embedding_size=state[f"{prefix}fc1.weight"].shape[0],
        window_size=(mel.shape[0] - 1) * 2,
        mel_bins=mel.shape[1],
    )


def import_reference_state(state: dict, source: str) -> SeparatorModelConfig:
    """Infer the model config of an official USS ``state_dict`` (Lightning prefixes), and strip
    its constant front-end matrices in place."""
    channels = []
    i = 1
    while f"ss_model.base.encoder_block{i}.conv_block1.conv1.weight" in state:
        channels.append(state[f"ss_model.base.encoder_block{i}.conv_block1.conv1.weight"].shape[0])
        i += 1
    if not channels:
        raise CheckpointError(f"{source}: no 'ss_model.base.encoder_block*' weights; not a USS separator checkpoint")
    film_key = "ss_model.film.encoder_block1->conv_block1->beta1.weight"
    condition_size = state[film_key].shape[1]
    n_fft = (state["ss_model.base.bn0.weight"].shape[0] - 1) * 2
    tagger = _cnn14_config_from_state(state, "query_net.base.")
    if "query_net.fc1.weight" in state:
        bottleneck_size = state["query_net.fc1.weight"].shape[1]
        query = QueryNetConfig(
            condition_type="adaptive",
            tagger=tagger,
            adaptor_bottleneck="at_soft" if bottleneck_size == tagger.classes_num else "embedding",
            adaptor_hidden=state["query_net.fc1.weight"].shape[0],
            adaptor_outputs=state["query_net.fc2.weight"].shape[0],
        )
    elif condition_size == tagger.classes_num:
        query = QueryNetConfig(condition_type="at_soft", tagger=tagger)
    elif condition_size == tagger.embedding_size:
        query = QueryNetConfig(condition_type="embedding", tagger=tagger)
    else:
        raise CheckpointError(
            f"{source}: condition size {condition_size} matches neither the tagger's classes "
            f"({tagger.classes_num}) nor its embedding ({tagger.embedding_size})"
        )
    _drop_reference_constants(state, "ss_model.base.stft", "stft", n_fft, source)
    _drop_reference_constants(state, "ss_model.base.istft", "istft", n_fft, source)
    _drop_reference_constants(state, "query_net.base.spectrogram_extractor.stft", "stft", tagger.window_size, source)
    return SeparatorModelConfig(
        separator=ResUNetConfig(condition_size=condition_size, encoder_channels=tuple(channels), n_fft=n_fft),
        query_net=query,
    )


def load_official_uss(path: str | Path, labels: LabelSet, tagger_path: str | Path | None = None) -> LoadedModel:
    """Load the official USS Lightning checkpoint, optionally with a PANNs Cnn14 activity tagger."""
    path = Path(path)
    checkpoint = _torch_load(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'state_dict'; expected an official USS (Lightning) checkpoint")
    state = {k: v for k, v in state.items() if k.startswith(("ss_model.", "query_net."))}
    config = import_reference_state(state, str(path))
    tagger_state = None
    if tagger_path is not None:
        tagger_config, tagger_state = read_panns_state(tagger_path)
        config = SeparatorModelConfig(config.separator, config.query_net, tagger=tagger_config)
        state.update({f"tagger.{k}": v for k, v in tagger_state.items()})
    if config.query_net.tagger.classes_num != len(labels):
        raise CheckpointError(
            f"{path}: the model has {config.query_net.tagger.classes_num} classes but the label set has "
            f"{len(labels)}; pass the label set it was trained with (--labels-csv)"
        )
    model = SeparatorModel(config)
    _load_state(model, state, str(path))
    return LoadedModel(model.eval(), labels, str(path), "uss-official")


def read_panns_state(path: str | Path) -> tuple[Cnn14Config, dict]:
    """Config and cleaned state dict of a PANNs checkpoint (``{"model": state_dict}``)."""
    path = Path(path)
    checkpoint = _torch_load(path)
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'model' entry; expected a PANNs checkpoint")
    state = dict(state)
    config = _cnn14_config_from_state(state, "")
    _drop_reference_constants(state, "spectrogram_extractor.stft", "stft", config.window_size, str(path))
    return config, state


def load_panns(path: str | Path, sound_event_detection: bool = False) -> Cnn14 | Cnn14DecisionLevelMax:
    """A PANNs checkpoint as :class:`Cnn14` (tagging) or :class:`Cnn14DecisionLevelMax` (SED).

    Both architectures share one state-dict layout; the caller says which head to build.
    """
    config, state = read_panns_state(path)
    model = (Cnn14DecisionLevelMax if sound_event_detection else Cnn14)(config)
    _load_state(model, state, str(path))
    return model.eval()


def reference_state_dict(model: SeparatorModel) -> dict[str, torch.Tensor]:
    """``model``'s weights in the reference's layout (Lightning prefixes, torchlibrosa constants),
    loadable into ``uss.models.pl_modules.LitSeparation`` with ``strict=True``."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("tagger.")}
    sep = model.config.separator
    state.update(reference_frontend_constants("ss_model.base.stft", "stft", sep.n_fft))
    state.update(reference_frontend_constants("ss_model.base.istft", "istft", sep.n_fft))
    if model.query_net.base is not None:
        window = model.config.query_net.tagger.window_size
        state.update(reference_frontend_constants("query_net.base.spectrogram_extractor.stft", "stft", window))
    return state


def panns_state_dict(tagger: Cnn14 | Cnn14DecisionLevelMax) -> dict[str, torch.Tensor]:
    """A tagger's weights in the PANNs layout (for ``{"model": ...}`` files)."""
    state = dict(tagger.state_dict())
    state.update(
        reference_frontend_constants("spectrogram_extractor.stft", "stft", tagger.config.window_size)
    )
    return state


def load_model(
    checkpoint: str | Path,
    labels: LabelSet | None = None,
    tagger_checkpoint: str | Path | None = None,
    metadata_dir: str | Path | None = None,
) -> LoadedModel:
    """Load any supported separation checkpoint.

    Args:
        checkpoint: an own-format directory, or an official USS ``.ckpt`` file.
        labels: label set for checkpoints that do not carry one (official USS); defaults to the
            AudioSet label set from the metadata directory.
        tagger_checkpoint: a PANNs Cnn14 checkpoint used as the activity tagger (overrides the
            checkpoint's own).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    if path.is_dir():
        loaded = _load_own(path)
        if tagger_checkpoint is not None:
            tagger_config, tagger_state = read_panns_state(tagger_checkpoint)
            model = loaded.model
            model.tagger = Cnn14(tagger_config).eval().requires_grad_(False)
            _load_state(model.tagger, tagger_state, str(tagger_checkpoint))
            model.config = SeparatorModelConfig(model.config.separator, model.config.query_net, tagger_config)
        return loaded
    if labels is None:
        from uss_core.ontology import load_label_set

        labels = load_label_set(metadata_dir)
    return load_official_uss(path, labels, tagger_checkpoint)
