"""Small real models (random weights, seeded) that the separation tests save and load."""

from pathlib import Path

import torch

from uss_core.checkpoints import SeparatorModel, SeparatorModelConfig, save_checkpoint
from uss_core.models.panns import Cnn14Config
from uss_core.models.query_nets import QueryNetConfig
from uss_core.models.resunet import ResUNetConfig
from uss_core.ontology import LabelSet


def tiny_checkpoint(path: Path, labels: LabelSet, condition_type: str = "at_soft") -> Path:
    """A 2-block separator with a 2-block tagger for ``labels``, saved in the project format."""
    tagger = Cnn14Config(classes_num=len(labels), conv_channels=(4, 8), embedding_size=8)
    query = QueryNetConfig(condition_type=condition_type, tagger=tagger)
    config = SeparatorModelConfig(
        separator=ResUNetConfig(condition_size=query.condition_size, encoder_channels=(4, 8)), query_net=query
    )
    torch.manual_seed(0)
    return save_checkpoint(SeparatorModel(config), labels, path)
