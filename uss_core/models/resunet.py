"""The query-conditioned separator: a residual U-Net on the STFT with FiLM conditioning.

:class:`ResUNet` with ``ResUNetConfig()`` (the defaults) is the paper's ResUNet30, with the
reference's module and parameter names (``base.encoder_block1.conv_block1.bn1.weight``,
``film.encoder_block1->conv_block1->beta1.weight``, ...), so official weights load unchanged.
Width and depth are configurable for smaller presets that train on a CPU.

The net predicts, per time-frequency bin, a magnitude mask (sigmoid) and a phase rotation
(tanh real/imag, normalised), applied to the mixture STFT, then the inverse STFT. Two options
for small nets trained on a CPU (the defaults are the reference's): ``mask="magnitude"`` keeps
the mixture's phase (no phase branch to learn first), ``input_scale="log"`` feeds the U-Net the
log magnitude (quiet bins matter as much as loud ones). With them (and the rest of the
``separator-cpu-small`` recipe) the demo's small net reaches 4.18 dB SDRi in 300 steps against
3.47 dB trained the reference's way (README, the ablation table).

CPU inference (eval mode, no autograd) takes a fused path with the same results within
float rounding: the batch runs row by row, so each FiLM bias is a per-channel constant that
folds, with the following batch norm, into the convolution before it; each residual block is
then two oneDNN convolutions with their bias, leaky ReLU and residual add fused in. In fp32 the
wide blocks (>= ``WINOGRAD_MIN_CHANNELS`` channels) convolve by Winograd's F(4x4, 3x3)
(:mod:`uss_core.models.winograd`), a quarter of the multiply-adds. Under bfloat16 autocast the
same path runs with bf16 activations and weights between the first and last 1x1 convolutions
(the STFT, FiLM and masks stay fp32): autocast's arithmetic without its per-layer casts and
separate normalisation passes. Training, GPUs and other autocast types keep the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from uss_core.models.frontend import InverseStft, Stft
from uss_core.models.winograd import winograd_conv3x3, winograd_weight
from uss_core.models.init import init_bn, init_layer


MASKS = ("complex", "magnitude")
INPUT_SCALES = ("linear", "log")
LOG_FLOOR = 1e-4  # added to the magnitude before the log: keeps silent bins finite
WINOGRAD_MIN_CHANNELS = 128  # fused path: below it oneDNN's direct convolution is faster (uss_core.models.winograd)


@dataclass(frozen=True)
class ResUNetConfig:
    """Architecture of the separator.

    ``encoder_channels[i]`` is the width of encoder block ``i+1``; every encoder block but the
    last halves time and frequency, the last halves frequency only (as ResUNet30). The bottleneck
    block and the decoder mirror the encoder.
    """

    condition_size: int = 527
    encoder_channels: tuple[int, ...] = (32, 64, 128, 256, 384, 384)
    n_fft: int = 2048
    hop_length: int = 320
    audio_channels: int = 1
    batchnorm_momentum: float = 0.01
    mask: str = "complex"  # "complex": magnitude mask + phase rotation (reference); "magnitude"
    input_scale: str = "linear"  # the U-Net's input: "linear" magnitude (reference) or "log"

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_channels", tuple(int(c) for c in self.encoder_channels))
        if len(self.encoder_channels) < 2:
            raise ValueError("ResUNetConfig.encoder_channels needs at least two blocks")
        if self.mask not in MASKS:
            raise ValueError(f"ResUNetConfig.mask must be one of {MASKS}, not {self.mask!r}")
        if self.input_scale not in INPUT_SCALES:
            raise ValueError(f"ResUNetConfig.input_scale must be one of {INPUT_SCALES}, not {self.input_scale!r}")

    @property
    def mask_outputs(self) -> int:
        """Output maps per audio channel: magnitude, phase real, phase imaginary (or magnitude only)."""
        return 3 if self.mask == "complex" else 1

    @property
    def time_downsample_ratio(self) -> int:
        return 2 ** (len(self.encoder_channels) - 1)


# oneDNN convolutions with fused post-ops (the kernels torch.compile uses on CPU), if this build has them.
_CONV_FUSED = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None


def fused_cpu_inference(x: torch.Tensor) -> bool:
    """Whether the U-Net can run its fused CPU inference path on ``x``: fp32 (or the bf16
    activations of :func:`fused_bf16_inference`) on a CPU with oneDNN, no autograd, no autocast.
    The caller also checks its module is in eval mode."""
    return (
        _CONV_FUSED is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )


def fused_bf16_inference(x: torch.Tensor) -> bool:
    """Whether a forward on ``x`` is CPU inference under bfloat16 autocast that the fused path can
    run instead, in bf16 (oneDNN present, no autograd). The caller also checks eval mode."""
    return (
        _CONV_FUSED is not None
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class FusedConv3x3:
    """A 3x3, stride-1, padding-1 convolution prepared for the fused CPU path on ``dtype``
    activations: in fp32 by Winograd where both channel counts reach ``WINOGRAD_MIN_CHANNELS``,
    else (and always in bf16, where oneDNN's AMX kernels beat it) oneDNN with its post-ops fused."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        out_channels, in_channels = weight.shape[:2]
        self.winograd = dtype == torch.float32 and min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS
        if self.winograd:
            self.weight = winograd_weight(weight)
        else:
            self.weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)

    def __call__(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, leaky_relu: bool = False, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``conv(x) + bias``, then ``+ residual``, then the leaky ReLU (each optional)."""
        if self.winograd:
            y = winograd_conv3x3(x, self.weight)
            if bias is not None:
                y.add_(bias[:, None, None])
            if residual is not None:
                y.add_(residual)
            return F.leaky_relu_(y, negative_slope=0.01) if leaky_relu else y
        pad = [1, 1], [1, 1], [1, 1]
        if residual is not None:
            return _CONV_FUSED.binary(
                x, residual, self.weight, bias, *pad, 1, "add", None, "leaky_relu" if leaky_relu else None,
                [0.01] if leaky_relu else [], None,
            )
        return _CONV_FUSED(x, self.weight, bias, *pad, 1, "leaky_relu" if leaky_relu else "none", [0.01] if leaky_relu else [], None)


def _film_row(film: dict, row: int) -> dict:
    """The FiLM biases of one batch row (nested like ``film``, batch dimension kept)."""
    return {k: _film_row(v, row) if isinstance(v, dict) else v[row : row + 1] for k, v in film.items()}


def bn_eval_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` per channel with ``bn(x) == x * scale + shift`` in eval mode."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def norm_film_act(bn: nn.BatchNorm2d, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``leaky_relu(bn(x) + beta)``; in eval mode as one fused multiply-add (inference hot path).

    ``x: (batch, channels, time, freq)``, ``beta: (batch, channels, 1, 1)``.
    """
    if bn.training:
        return F.leaky_relu(bn(x) + beta, negative_slope=0.01)
    if x.shape[0] == 1 and fused_cpu_inference(x):  # one row: beta is a per-channel constant, a BN bias
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias + beta.flatten(), False, 0.0, bn.eps)
        return F.leaky_relu_(y, negative_slope=0.01)
    scale, shift = bn_eval_affine(bn)
    # In x's dtype: under bf16 autocast, fp32 constants would promote the whole activation to
    # fp32 and back. mul + add_ keep x's memory format (channels-last on CPU); addcmul would not.
    y = x * scale.to(x.dtype)[:, None, None]
    return F.leaky_relu_(y.add_((shift[:, None, None] + beta).to(x.dtype)), negative_slope=0.01)


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as a matmul over channels, returning a channels-last tensor.

    Same result as ``conv(x)``, in ``x``'s dtype; oneDNN is slow on 1x1 convolutions with one
    input channel.
    """
    weight, bias = conv.weight[:, :, 0, 0].to(x.dtype), conv.bias.to(x.dtype)
    x = x.permute(0, 2, 3, 1)
    if weight.shape[1] == 1:  # an outer product: a broadcast multiply-add beats a K=1 matmul
        y = torch.addcmul(bias, x, weight[:, 0])
    else:
        y = F.linear(x, weight, bias)
    return y.permute(0, 3, 1, 2)


def transposed_upsample(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A transposed convolution whose kernel equals its stride, as a matmul + depth-to-space.

    ``x: (batch, in, time, freq) -> (batch, out, time * kt, freq * kf)``, same result as
    ``conv(x)`` (the kernels do not overlap, so each input pixel expands to one output block),
    several times faster on CPU, channels-last out, in ``x``'s dtype.
    """
    in_channels, out_channels, kt, kf = conv.weight.shape
    batch, _, time, freq = x.shape
    weight = conv.weight.reshape(in_channels, out_channels * kt * kf).t().to(x.dtype)
    y = F.linear(x.permute(0, 2, 3, 1), weight)  # (batch, time, freq, out * kt * kf)
    y = y.reshape(batch, time, freq, out_channels, kt, kf).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(batch, time * kt, freq * kf, out_channels).permute(0, 3, 1, 2)


class ConvBlockRes(nn.Module):
    """Pre-activation residual block: (BN + FiLM bias, leaky ReLU, 3x3 conv) x 2, plus shortcut."""

    has_film = True

    def __init__(self, in_channels: int, out_channels: int, momentum: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=momentum)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=momentum)
        self.conv1 = nn.Conv2d(in_channels, out_channels, (3, 3), padding=(1, 1), bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, (3, 3), padding=(1, 1), bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        init_bn(self.bn1)
        init_bn(self.bn2)
        init_layer(self.conv1)
        init_layer(self.conv2)
        if self.shortcut is not None:
            init_layer(self.shortcut)
        self._fused: tuple | None = None  # see _fused_weights

    def film_sizes(self) -> dict:
        return {"beta1": self.bn1.num_features, "beta2": self.bn2.num_features}

    def forward(self, x: torch.Tensor, film: dict) -> torch.Tensor:
        """``x: (batch, in_channels, time, freq) -> (batch, out_channels, time, freq)``."""
        if x.shape[0] == 1 and not self.training and fused_cpu_inference(x):
            return self._forward_fused(x, film)
        h = self.conv1(norm_film_act(self.bn1, x, film["beta1"]))
        h = self.conv2(norm_film_act(self.bn2, h, film["beta2"]))
        return h.add_(self.shortcut(x) if self.shortcut is not None else x)

    def _forward_fused(self, x: torch.Tensor, film: dict) -> torch.Tensor:
        """:meth:`forward` for one row in eval mode: conv1 with bn2, the FiLM bias and the leaky
        ReLU folded in (for one row the bias is a per-channel constant), conv2 with the shortcut
        added, each one oneDNN call (Winograd in the wide blocks). Same result within float
        rounding."""
        conv1, shift, conv2 = self._fused_weights(x.dtype)
        a = norm_film_act(self.bn1, x, film["beta1"])
        h = conv1(a, bias=shift + film["beta2"].flatten(), leaky_relu=True)
        return conv2(h, residual=pointwise_conv(self.shortcut, x) if self.shortcut is not None else x)

    def train(self, mode: bool = True) -> "ConvBlockRes":
        self._fused = None  # eval() after editing weights through .data (no version bump) refreshes them
        return super().train(mode)

    def _fused_weights(self, dtype: torch.dtype) -> tuple["FusedConv3x3", torch.Tensor, "FusedConv3x3"]:
        """``(conv1 scaled by bn2's eval scale, bn2's eval shift, conv2)``, prepared for the fused
        path on ``dtype`` activations; recomputed for another dtype, when a tensor they come from
        changed (moved, or written in place: loaded, trained; its version counter), or on
        ``train()`` / ``eval()``."""
        sources = (self.conv1.weight, self.conv2.weight, self.bn2.weight, self.bn2.bias, self.bn2.running_mean, self.bn2.running_var)
        key = tuple((t.data_ptr(), t._version) for t in sources) + (self.bn2.eps, dtype)
        if self._fused is None or self._fused[0] != key:
            scale, shift = bn_eval_affine(self.bn2)
            conv1 = FusedConv3x3(self.conv1.weight * scale[:, None, None, None], dtype)
            self._fused = (key, conv1, shift, FusedConv3x3(self.conv2.weight, dtype))
        return self._fused[1:]


class EncoderBlock(nn.Module):
    """A residual block followed by average pooling; returns ``(pooled, skip)``."""

    def __init__(self, in_channels: int, out_channels: int, downsample: tuple[int, int], momentum: float):
        super().__init__()
        self.conv_block1 = ConvBlockRes(in_channels, out_channels, momentum)
        self.downsample = downsample

    def film_sizes(self) -> dict:
        return {"conv_block1": self.conv_block1.film_sizes()}

    def forward(self, x: torch.Tensor, film: dict) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.conv_block1(x, film["conv_block1"])
        pooled = F.avg_pool2d(skip, kernel_size=self.downsample) if self.downsample != (1, 1) else skip
        return pooled, skip


class DecoderBlock(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip, and a residual block."""

    def __init__(self, in_channels: int, out_channels: int, upsample: tuple[int, int], momentum: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=momentum)
        # Unused in forward, kept because the reference has it: its weights are in every official
        # checkpoint, and the reference derives a (likewise unused) FiLM layer from it.
        self.bn2 = nn.BatchNorm2d(in_channels, momentum=momentum)
        self.conv1 = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=upsample, stride=upsample, bias=False)
        self.conv_block2 = ConvBlockRes(out_channels * 2, out_channels, momentum)
        init_bn(self.bn1)
        init_layer(self.conv1)

    def film_sizes(self) -> dict:
        return {
            "beta1": self.bn1.num_features,
            "beta2": self.bn2.num_features,
            "conv_block2": self.conv_block2.film_sizes(),
        }

    def forward(self, x: torch.Tensor, skip: torch.Tensor, film: dict) -> torch.Tensor:
        x = transposed_upsample(self.conv1, norm_film_act(self.bn1, x, film["beta1"]))
        return self.conv_block2(torch.cat((x, skip), dim=1), film["conv_block2"])


class ResUNetBase(nn.Module):
    """The U-Net proper: ``forward(mixture (batch, channels, samples), film) -> (batch, channels, samples)``."""

    def __init__(self, config: ResUNetConfig) -> None:
        super().__init__()
        self.config = config
        momentum = config.batchnorm_momentum
        channels = config.encoder_channels
        depth = len(channels)
        self.stft = Stft(config.n_fft, config.hop_length)
        self.istft = InverseStft(config.n_fft, config.hop_length)
        self.bn0 = nn.BatchNorm2d(config.n_fft // 2 + 1, momentum=momentum)
        self.pre_conv = nn.Conv2d(config.audio_channels, channels[0], (1, 1))
        in_channels = channels[0]
        for i, out_channels in enumerate(channels, start=1):
            downsample = (2, 2) if i < depth else (1, 2)
            self.add_module(f"encoder_block{i}", EncoderBlock(in_channels, out_channels, downsample, momentum))
            in_channels = out_channels
        self.center_name = f"conv_block{depth + 1}a"
        self.add_module(self.center_name, EncoderBlock(in_channels, in_channels, (1, 1), momentum))
        for i, out_channels in enumerate(reversed(channels), start=1):
            upsample = (1, 2) if i == 1 else (2, 2)
            self.add_module(f"decoder_block{i}", DecoderBlock(in_channels, out_channels, upsample, momentum))
            in_channels = out_channels
        self.after_conv = nn.Conv2d(channels[0], config.audio_channels * config.mask_outputs, (1, 1))
        self.depth = depth
        init_bn(self.bn0)
        init_layer(self.pre_conv)
        init_layer(self.after_conv)

    def film_sizes(self) -> dict:
        """Nested ``{block: {layer: num_features}}`` of every FiLM bias, in the reference's order."""
        names = [f"encoder_block{i}" for i in range(1, self.depth + 1)] + [self.center_name]
        names += [f"decoder_block{i}" for i in range(1, self.depth + 1)]
        return {name: getattr(self, name).film_sizes() for name in names}

    def forward(self, mixture: torch.Tensor, film: dict, body_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``body_dtype``: the activations' dtype between ``pre_conv`` and ``after_conv`` (bf16 on
        the fused path under bf16 autocast, see :class:`ResUNet`)."""
        batch, audio_channels, samples = mixture.shape
        if batch > 1 and not self.training and fused_cpu_inference(mixture):
            # Row by row, each FiLM bias is a per-channel constant that the fused convolutions
            # take as their bias; CPU throughput does not depend on the batch size anyway.
            return torch.cat([self(mixture[i : i + 1], _film_row(film, i), body_dtype) for i in range(batch)])
        real, imag = self.stft(mixture.reshape(batch * audio_channels, samples))
        # (batch * channels, 1, frames, bins) -> (batch, channels, frames, bins)
        real = real.reshape(batch, audio_channels, *real.shape[2:])
        imag = imag.reshape(batch, audio_channels, *imag.shape[2:])
        mag = torch.clamp(real**2 + imag**2, min=1e-10) ** 0.5
        cos_in, sin_in = real / mag, imag / mag

        x = torch.log(mag + LOG_FLOOR) if self.config.input_scale == "log" else mag
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        frames = x.shape[2]
        ratio = self.config.time_downsample_ratio
        x = F.pad(x, (0, 0, 0, -frames % ratio))
        x = x[..., :-1]  # 1025 -> 1024 frequency bins, divisible by the pooling
        x = pointwise_conv(self.pre_conv, x).to(body_dtype)

        skips = []
        for i in range(1, self.depth + 1):
            x, skip = getattr(self, f"encoder_block{i}")(x, film[f"encoder_block{i}"])
            skips.append(skip)
        x, _ = getattr(self, self.center_name)(x, film[self.center_name])
        for i in range(1, self.depth + 1):
            x = getattr(self, f"decoder_block{i}")(x, skips[-i], film[f"decoder_block{i}"])

        x = self.after_conv(x.float())
        x = F.pad(x, (0, 1))[:, :, :frames, :]
        return self._apply_masks(x, mag, cos_in, sin_in, samples)

    def _apply_masks(self, x, mag, cos_in, sin_in, samples: int) -> torch.Tensor:
        """Masks ``x: (batch, channels * mask_outputs, frames, bins)`` applied to the mixture's STFT, inverted."""
        batch, audio_channels = mag.shape[:2]
        x = x.reshape(batch, audio_channels, self.config.mask_outputs, *x.shape[2:])
        mask_mag = torch.sigmoid(x[:, :, 0])
        if self.config.mask == "magnitude":
            out_cos, out_sin = cos_in, sin_in
        else:
            mask_real = torch.tanh(x[:, :, 1])
            mask_imag = torch.tanh(x[:, :, 2])
            mask_norm = torch.clamp((mask_real**2 + mask_imag**2) ** 0.5, min=1e-10)
            mask_cos, mask_sin = mask_real / mask_norm, mask_imag / mask_norm
            out_cos = cos_in * mask_cos - sin_in * mask_sin
            out_sin = sin_in * mask_cos + cos_in * mask_sin
        out_mag = F.relu(mag * mask_mag)
        out_real = (out_mag * out_cos).reshape(batch * audio_channels, 1, *mag.shape[2:])
        out_imag = (out_mag * out_sin).reshape(batch * audio_channels, 1, *mag.shape[2:])
        waveform = self.istft(out_real, out_imag, samples)
        return waveform.reshape(batch, audio_channels, samples)


class FiLM(nn.Module):
    """One linear layer per FiLM bias, mapping the condition to that layer's channel biases.

    Layers are registered under the reference's flat names (``encoder_block1->conv_block1->beta1``).
    ``forward(condition (batch, condition_size))`` returns the nested dict the U-Net consumes,
    each bias shaped ``(batch, channels, 1, 1)``.
    """

    def __init__(self, film_sizes: dict, condition_size: int) -> None:
        super().__init__()
        self.condition_size = condition_size
        self.paths: list[tuple[str, ...]] = []
        self._register(film_sizes, ())

    def _register(self, sizes: dict, prefix: tuple[str, ...]) -> None:
        for name, value in sizes.items():
            path = prefix + (name,)
            if isinstance(value, dict):
                self._register(value, path)
            else:
                layer = nn.Linear(self.condition_size, value)
                init_layer(layer)
                self.add_module("->".join(path), layer)
                self.paths.append(path)

    def forward(self, condition: torch.Tensor) -> dict:
        film: dict = {}
        for path in self.paths:
            node = film
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = getattr(self, "->".join(path))(condition)[:, :, None, None]
        return film


class ResUNet(nn.Module):
    """FiLM-conditioned separator.

    ``forward(mixture (batch, channels, samples), condition (batch, condition_size))`` returns the
    separated waveform ``(batch, channels, samples)``.
    """

    def __init__(self, config: ResUNetConfig = ResUNetConfig()) -> None:
        super().__init__()
        self.config = config
        self.base = ResUNetBase(config)
        self.film = FiLM(self.base.film_sizes(), config.condition_size)

    def forward(self, mixture: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if not self.training and fused_bf16_inference(mixture):
            # The fused path in bf16 instead of op-by-op autocast: bf16 convolutions still, without
            # the casts and separate passes (benchmarks.bench_separate times both); FiLM, the
            # STFT and the masks in fp32.
            with torch.autocast("cpu", enabled=False):
                return self.base(mixture, self.film(condition), torch.bfloat16)
        return self.base(mixture, self.film(condition))
