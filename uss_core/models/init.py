"""Weight initialisation shared by all models (the reference's scheme)."""

import torch.nn as nn


def init_layer(layer: nn.Module) -> None:
    """Xavier-uniform weights and zero bias for a linear or convolutional layer."""
    nn.init.xavier_uniform_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        layer.bias.data.fill_(0.0)


def init_bn(bn: nn.BatchNorm2d) -> None:
    """Identity affine transform for a batch-norm layer."""
    bn.bias.data.fill_(0.0)
    bn.weight.data.fill_(1.0)
