"""Query nets: turn a query (class set or example audio) into the separator's condition vector.

Condition types (the paper's ablation axis):

- ``hard``: the multi-hot vector of the queried classes; needs no audio model.
- ``at_soft``: Cnn14's 527 clip-level tagging probabilities of the query audio.
- ``embedding``: Cnn14's 2048-d penultimate layer.
- ``adaptive``: a learnable two-layer MLP (``fc1``, ``fc2``) on top of ``at_soft`` or ``embedding``.

Every net splits into ``bottleneck(audio)`` (the frozen tagger part) and ``adapt(bottleneck)``
(identity, or the MLP). A class query masks the bottleneck to the queried classes before
adapting, as the reference does; that needs a class-indexed bottleneck (``hard``, ``at_soft``,
or ``adaptive`` over ``at_soft``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from uss_core.errors import ConfigError
from uss_core.models.init import init_layer
from uss_core.models.panns import Cnn14, Cnn14Config

CONDITION_TYPES = ("hard", "at_soft", "embedding", "adaptive")


@dataclass(frozen=True)
class QueryNetConfig:
    """Which condition the separator is trained on and how it is computed."""

    condition_type: str = "at_soft"
    tagger: Cnn14Config = field(default_factory=Cnn14Config)
    adaptor_bottleneck: str = "at_soft"  # for "adaptive": "at_soft" or "embedding"
    adaptor_hidden: int = 2048
    adaptor_outputs: int = 2048
    freeze_base: bool = True

    def __post_init__(self) -> None:
        if self.condition_type not in CONDITION_TYPES:
            raise ConfigError(
                f"unknown condition type {self.condition_type!r}; choose one of {', '.join(CONDITION_TYPES)}"
            )
        if self.adaptor_bottleneck not in ("at_soft", "embedding"):
            raise ConfigError(f"adaptor_bottleneck must be 'at_soft' or 'embedding', got {self.adaptor_bottleneck!r}")
        if isinstance(self.tagger, dict):
            object.__setattr__(self, "tagger", Cnn14Config(**self.tagger))

    @property
    def bottleneck_type(self) -> str:
        """``hard``, ``at_soft`` or ``embedding``: what ``QueryNet.bottleneck`` returns."""
        if self.condition_type == "adaptive":
            return self.adaptor_bottleneck
        return self.condition_type

    @property
    def bottleneck_size(self) -> int:
        return self.tagger.embedding_size if self.bottleneck_type == "embedding" else self.tagger.classes_num

    @property
    def condition_size(self) -> int:
        return self.adaptor_outputs if self.condition_type == "adaptive" else self.bottleneck_size

    @property
    def supports_class_queries(self) -> bool:
        """Whether a class set can be turned into a condition (the bottleneck is class-indexed)."""
        return self.bottleneck_type in ("hard", "at_soft")


class QueryNet(nn.Module):
    """``forward(audio (batch, samples)) -> condition (batch, condition_size)``.

    Submodules carry the reference's names: ``base`` (Cnn14) and, for ``adaptive``, ``fc1``/``fc2``.
    """

    def __init__(self, config: QueryNetConfig = QueryNetConfig()) -> None:
        super().__init__()
        self.config = config
        self.base = Cnn14(config.tagger) if config.bottleneck_type != "hard" else None
        if config.condition_type == "adaptive":
            self.fc1 = nn.Linear(config.bottleneck_size, config.adaptor_hidden)
            self.fc2 = nn.Linear(config.adaptor_hidden, config.adaptor_outputs)
            init_layer(self.fc1)
            init_layer(self.fc2)
        if self.base is not None and config.freeze_base:
            self.base.requires_grad_(False)

    @property
    def condition_size(self) -> int:
        return self.config.condition_size

    def train(self, mode: bool = True) -> "QueryNet":
        super().train(mode)
        # A frozen tagger always runs in eval mode (batch-norm statistics and dropout fixed).
        if self.base is not None and self.config.freeze_base:
            self.base.eval()
        return self

    def bottleneck(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio (batch, samples) -> (batch, bottleneck_size)``; all ones for ``hard`` (every class on)."""
        if self.base is None:
            return audio.new_ones(audio.shape[0], self.config.bottleneck_size)
        if self.config.freeze_base:
            with torch.no_grad():
                out = self.base(audio)
        else:
            out = self.base(audio)
        return out["embedding" if self.config.bottleneck_type == "embedding" else "clipwise_output"]

    def adapt(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """``(batch, bottleneck_size) -> (batch, condition_size)``: identity unless ``adaptive``."""
        if self.config.condition_type != "adaptive":
            return bottleneck
        x = F.dropout(F.leaky_relu(self.fc1(bottleneck), negative_slope=0.01), p=0.5, training=self.training)
        return F.dropout(F.leaky_relu(self.fc2(x), negative_slope=0.01), p=0.5, training=self.training)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.adapt(self.bottleneck(audio))

    def class_condition(self, bottleneck: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        """Condition for a class query: the bottleneck restricted to the queried classes, adapted.

        Args:
            bottleneck: ``(batch, classes)`` from :meth:`bottleneck`.
            class_mask: ``(batch, classes)`` or ``(classes,)``, 1 for queried classes.
        """
        self.require_class_queries()
        return self.adapt(bottleneck * class_mask)

    def require_class_queries(self) -> None:
        """Raise ConfigError unless this net can turn a class set into a condition."""
        if not self.config.supports_class_queries:
            raise ConfigError(
                f"a '{self.config.condition_type}' model (bottleneck '{self.config.bottleneck_type}') cannot be "
                "queried by class: its condition is not indexed by class. Query it with example audio "
                "(--query-audio DIR) instead."
            )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters an optimiser should update (the adaptor; the base too if not frozen)."""
        return [p for p in self.parameters() if p.requires_grad]
