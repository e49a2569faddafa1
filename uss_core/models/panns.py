"""PANNs audio tagging models: Cnn14 (clip-level) and Cnn14_DecisionLevelMax (frame-level SED).

With ``Cnn14Config()`` (the defaults) both are exactly the PANNs models, with the reference's
parameter names, so ``Cnn14_mAP=0.431.pth`` / ``Cnn14_DecisionLevelMax_mAP=0.385.pth`` load.
Smaller presets (fewer, narrower conv blocks) keep the same structure for CPU training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from uss_core.models.frontend import LogMelFilterBank, PowerSpectrogram
from uss_core.models.init import init_bn, init_layer


TAGGER_HEADS = ("clip", "sed")


@dataclass(frozen=True)
class Cnn14Config:
    """Architecture and front end of a Cnn14-family tagger.

    Every conv block but the last halves time and mel resolution; ``embedding_size`` is the width
    of ``fc1`` (the 2048-d "embedding" of Cnn14).
    """

    classes_num: int = 527
    conv_channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    embedding_size: int = 2048
    sample_rate: int = 32000
    window_size: int = 1024
    hop_size: int = 320
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    # PANNs' dropout (0.2 after each conv block, 0.5 in the head) while training; False trains the
    # small CPU presets several times faster on a few hundred clips. Inference is the same either way.
    dropout: bool = True
    # The head the weights were trained with: "clip" (Cnn14's: pooled features -> fc1 -> sigmoid,
    # PANNs' Cnn14) or "sed" (Cnn14_DecisionLevelMax's: the max over frames of frame-wise
    # sigmoids). Both share one state dict, but probabilities are only right through the head that
    # was trained, so a Cnn14 of "sed" weights takes its clip-level output the "sed" way.
    head: str = "clip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        if len(self.conv_channels) < 2:
            raise ValueError("Cnn14Config.conv_channels needs at least two blocks")
        if self.head not in TAGGER_HEADS:
            raise ValueError(f"Cnn14Config.head must be one of {TAGGER_HEADS}, got {self.head!r}")

    @property
    def time_downsample_ratio(self) -> int:
        return 2 ** (len(self.conv_channels) - 1)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_size


class ConvBlock(nn.Module):
    """(3x3 conv, BN, ReLU) x 2 then average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, (3, 3), padding=(1, 1), bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, (3, 3), padding=(1, 1), bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        init_layer(self.conv1)
        init_layer(self.conv2)
        init_bn(self.bn1)
        init_bn(self.bn2)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool_size) if pool_size != (1, 1) else x


class _Cnn14Trunk(nn.Module):
    """Log-mel front end and conv blocks shared by both heads."""

    def __init__(self, config: Cnn14Config) -> None:
        super().__init__()
        self.config = config
        self.spectrogram_extractor = PowerSpectrogram(config.window_size, config.hop_size)
        self.logmel_extractor = LogMelFilterBank(
            config.sample_rate, config.window_size, config.mel_bins, config.fmin, config.fmax
        )
        self.bn0 = nn.BatchNorm2d(config.mel_bins)
        in_channels = 1
        for i, out_channels in enumerate(config.conv_channels, start=1):
            self.add_module(f"conv_block{i}", ConvBlock(in_channels, out_channels))
            in_channels = out_channels
        self.fc1 = nn.Linear(in_channels, config.embedding_size)
        self.fc_audioset = nn.Linear(config.embedding_size, config.classes_num)
        init_bn(self.bn0)
        init_layer(self.fc1)
        init_layer(self.fc_audioset)

    def features(self, waveform: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``waveform (batch, samples)`` -> ``((batch, channels, time), frames)`` after the conv blocks."""
        # The log-mel front end in fp32 even under autocast: bf16's 8-bit mantissa would blur the
        # log of small powers, and inference (mining, tagging) computes it in fp32.
        with torch.autocast(waveform.device.type, enabled=False):
            x = self.logmel_extractor(self.spectrogram_extractor(waveform.float()))  # (batch, 1, frames, mel)
        frames = x.shape[2]
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        blocks = len(self.config.conv_channels)
        for i in range(1, blocks + 1):
            x = getattr(self, f"conv_block{i}")(x, pool_size=(2, 2) if i < blocks else (1, 1))
            x = F.dropout(x, p=0.2, training=self.training and self.config.dropout)
        return torch.mean(x, dim=3), frames

    def segmentwise(self, features: torch.Tensor) -> torch.Tensor:
        """The decision-level head: ``features`` ``(batch, channels, time)`` -> frame-wise
        probabilities ``(batch, time, classes)`` at the trunk's time resolution."""
        x = F.max_pool1d(features, kernel_size=3, stride=1, padding=1)
        x = x + F.avg_pool1d(features, kernel_size=3, stride=1, padding=1)
        x = F.dropout(x, p=0.5, training=self.training and self.config.dropout)
        x = F.relu(self.fc1(x.transpose(1, 2)))
        x = F.dropout(x, p=0.5, training=self.training and self.config.dropout)
        return torch.sigmoid(self.fc_audioset(x))


class Cnn14(_Cnn14Trunk):
    """Clip-level tagger. ``forward(waveform (batch, samples))`` returns
    ``{"clipwise_output": (batch, classes), "embedding": (batch, embedding_size)}``; the
    clip-level probabilities come through ``config.head`` (the head the weights were trained with)."""

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        features, _ = self.features(waveform)
        x = torch.amax(features, dim=2) + torch.mean(features, dim=2)
        x = F.dropout(x, p=0.5, training=self.training and self.config.dropout)
        x = F.relu(self.fc1(x))
        embedding = F.dropout(x, p=0.5, training=self.training and self.config.dropout)
        if self.config.head == "sed":
            clipwise = torch.amax(self.segmentwise(features), dim=1)
        else:
            clipwise = torch.sigmoid(self.fc_audioset(x))
        return {"clipwise_output": clipwise, "embedding": embedding}


class Cnn14DecisionLevelMax(_Cnn14Trunk):
    """Frame-level sound event detector. ``forward(waveform (batch, samples))`` returns
    ``{"framewise_output": (batch, frames, classes), "clipwise_output": (batch, classes)}``
    with one frame per hop (100 frames per second at the defaults)."""

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        x, frames = self.features(waveform)
        segmentwise = self.segmentwise(x)  # (batch, time, classes)
        clipwise = torch.amax(segmentwise, dim=1)
        framewise = torch.repeat_interleave(segmentwise, self.config.time_downsample_ratio, dim=1)
        if framewise.shape[1] < frames:
            framewise = torch.cat([framewise, framewise[:, -1:].expand(-1, frames - framewise.shape[1], -1)], dim=1)
        return {"framewise_output": framewise[:, :frames], "clipwise_output": clipwise}
