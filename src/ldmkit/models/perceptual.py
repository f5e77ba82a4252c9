"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 trunk, as used by the LDM stage-1 losses.

    d(x, y) = sum_l  mean_{h,w}  w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2        (LPIPS eq. 1)

f_l are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the shifted and scaled
input, |.| is the channel-wise L2 norm and w_l >= 0 are the learned 1x1 "lin" weights.

Key names follow taming-transformers' ``LPIPS`` (the reference's ``loss.perceptual_loss.*``):
``scaling_layer.{shift,scale}``, ``net.slice{1..5}.<i>.{weight,bias}`` where ``<i>`` is the layer's
index in torchvision's ``vgg16().features``, and ``lin{0..4}.model.1.weight``.

Nothing is downloaded. Pretrained weights come from two files the user supplies, read with
``torch.load(weights_only=True)`` or safetensors:

    lpips = LPIPS.from_files("vgg16-397923af.pth",          # torchvision VGG16 state dict
                             "lpips/weights/v0.1/vgg.pth")   # the lpips package's lin weights

``LPIPS()`` without files has random weights and ``is_pretrained`` False; the training losses refuse it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from .weights_file import WeightsFileError, read_tensor_file

# LPIPS input normalisation for images in [-1, 1]: (x - shift) / scale (lpips ScalingLayer).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# torchvision VGG16 ("cfg D") `features`: conv widths with "M" for 2x2 max-pooling. Every conv is followed
# by a ReLU, so conv k of the list sits at an even index and its ReLU right after it.
_VGG16_CFG: tuple[int | Literal["M"], ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)
# features[a:b] for the five slices; each ends right after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # channels of the five tapped activations


class LPIPSWeightsError(ValueError):
    """A VGG16 or LPIPS lin weights file is unreadable, lacks keys or has wrong shapes (the file is named)."""


def _vgg16_features() -> list[nn.Module]:
    """The 31 layers of torchvision's ``vgg16().features`` (indices 0..30), in order."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU()]
            c_in = v
    return layers


def vgg16_conv_indices() -> tuple[int, ...]:
    """Indices of the conv layers inside ``features`` that LPIPS uses (0, 2, 5, ..., 28)."""
    layers = _vgg16_features()
    return tuple(i for i in range(_SLICE_BOUNDS[-1][1]) if isinstance(layers[i], nn.Conv2d))


def _slice_of(index: int) -> int:
    for s, (a, b) in enumerate(_SLICE_BOUNDS):
        if a <= index < b:
            return s + 1
    raise ValueError(f"features.{index} is not part of the LPIPS VGG16 trunk (indices 0..29)")


def normalize_tensor(x: Tensor, eps: float = 1e-10) -> Tensor:
    """x / (|x|_2 + eps) over channels (dim 1).

    Same value as lpips' ``sqrt(sum(x**2))``; ``vector_norm`` is used because its gradient at an all-zero
    feature vector is 0, where the sqrt form gives NaN (0 * inf).
    """
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (B, 1, H, W)
    return x / (norm + eps)


def spatial_average(x: Tensor, keepdim: bool = True) -> Tensor:
    """Mean over height and width."""
    return x.mean(dim=(2, 3), keepdim=keepdim)


class ScalingLayer(nn.Module):
    """(x - shift) / scale with the LPIPS constants; buffers ``shift`` and ``scale`` are [1, 3, 1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.shift: Tensor
        self.scale: Tensor
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class VGG16Trunk(nn.Module):
    """VGG16 ``features[0:30]`` split into ``slice1..slice5``; children keep their ``features`` index."""

    def __init__(self) -> None:
        super().__init__()
        layers = _vgg16_features()
        for s, (a, b) in enumerate(_SLICE_BOUNDS):
            block = nn.Sequential()
            for i in range(a, b):
                block.add_module(str(i), layers[i])
            self.add_module(f"slice{s + 1}", block)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Image (B, 3, H, W) -> [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3] at H, H/2, ..., H/16."""
        feats = []
        h = x
        for s in range(1, len(_SLICE_BOUNDS) + 1):
            h = getattr(self, f"slice{s}")(h)
            feats.append(h)
        return feats


class NetLinLayer(nn.Module):
    """The learned per-channel weights w_l: ``model = Sequential(Dropout, Conv2d(c, 1, 1, bias=False))``."""

    def __init__(self, channels: int, use_dropout: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance between two image batches in [-1, 1]; returns (B, 1, 1, 1).

    All weights are frozen and the module always stays in eval mode (``train()`` is a no-op), so the
    lin-layer dropout never fires. The reference calls ``.eval()`` once but its parent's ``.train()``
    re-enables that dropout during stage-1 training; here the distance is deterministic.
    """

    def __init__(self, use_dropout: bool = True) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Trunk()
        for i, c in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{i}", NetLinLayer(c, use_dropout=use_dropout))
        self.requires_grad_(False)
        # True only after weights were loaded from files or state dicts given by the caller. Random weights
        # are not LPIPS: the stage-1 losses check this flag and refuse a module that has it False.
        self.pretrained = False
        super().train(False)

    @property
    def is_pretrained(self) -> bool:
        """Whether the weights came from user-supplied VGG16 and LPIPS lin files (never random)."""
        return self.pretrained

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode whatever ``mode`` is: LPIPS is a fixed metric, not a trained network."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance per image pair: x, y (B, 3, H, W) in [-1, 1], H and W >= 16 -> (B, 1, 1, 1)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two RGB batches (B, 3, H, W) of the same shape, got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS needs images of at least 16x16 (four 2x pools), got {tuple(x.shape[-2:])}")
        feats_x = self.net(self.scaling_layer(x))  # 5 x (B, C_l, H_l, W_l)
        feats_y = self.net(self.scaling_layer(y))
        dist = x.new_zeros(x.shape[0], 1, 1, 1)
        for i, (fx, fy) in enumerate(zip(feats_x, feats_y, strict=True)):
            diff = (normalize_tensor(fx) - normalize_tensor(fy)) ** 2  # (B, C_l, H_l, W_l)
            lin = getattr(self, f"lin{i}")
            dist = dist + spatial_average(lin(diff), keepdim=True)  # (B, 1, 1, 1)
        return dist

    # --- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vgg16_path: str | Path, lin_path: str | Path) -> LPIPS:
        """Build from local files: torchvision's VGG16 state dict and the lpips ``weights/v0.1/vgg.pth``.

        ``vgg16_path`` holds ``features.{i}.weight/bias`` (``classifier.*`` and other extra keys are
        ignored); ``lin_path`` holds ``lin{0..4}.model.1.weight``. Either may be ``.safetensors``.
        Pickles are read with ``weights_only=True``: nothing in them is executed.
        """
        vgg16_path, lin_path = Path(vgg16_path), Path(lin_path)
        return cls.from_state_dicts(
            _read_tensors(vgg16_path), _read_tensors(lin_path), vgg16_source=str(vgg16_path), lin_source=str(lin_path)
        )

    @classmethod
    def from_state_dicts(
        cls,
        vgg16_state: Mapping[str, Tensor],
        lin_state: Mapping[str, Tensor],
        *,
        vgg16_source: str = "VGG16 state dict",
        lin_source: str = "LPIPS lin state dict",
    ) -> LPIPS:
        """Build from in-memory state dicts in the two file layouts of ``from_files``."""
        state = {
            "scaling_layer.shift": torch.tensor(LPIPS_SHIFT)[None, :, None, None],
            "scaling_layer.scale": torch.tensor(LPIPS_SCALE)[None, :, None, None],
        }
        state.update(_map_vgg16(vgg16_state, vgg16_source))
        state.update(_pick_lins(lin_state, lin_source))
        with torch.device("meta"):  # no throw-away random init; every tensor is assigned below
            model = cls(use_dropout=True)
        model.load_state_dict(state, strict=True, assign=True)
        model.pretrained = True
        return model


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return read_tensor_file(path, "LPIPS weights file")
    except WeightsFileError as e:
        raise LPIPSWeightsError(str(e)) from None


def _expected_shapes_vgg16() -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    layers = _vgg16_features()
    for i in vgg16_conv_indices():
        conv = layers[i]
        assert isinstance(conv, nn.Conv2d)
        shapes[i] = (tuple(conv.weight.shape), (conv.out_channels,))
    return shapes


def _check_shapes(got: Mapping[str, Tensor], want: Mapping[str, tuple[int, ...]], source: str) -> None:
    missing = [k for k in want if k not in got]
    if missing:
        raise LPIPSWeightsError(f"{source} is missing {len(missing)} key(s) LPIPS needs: {', '.join(missing)}")
    wrong = [f"{k} {tuple(got[k].shape)} (want {want[k]})" for k in want if tuple(got[k].shape) != want[k]]
    if wrong:
        raise LPIPSWeightsError(f"{source} has tensors of the wrong shape: {'; '.join(wrong)}")


def _map_vgg16(sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """torchvision ``features.{i}.*`` -> ``net.slice{s}.{i}.*``; only the 13 LPIPS convs are read."""
    want: dict[str, tuple[int, ...]] = {}
    for i, (w_shape, b_shape) in _expected_shapes_vgg16().items():
        want[f"features.{i}.weight"] = w_shape
        want[f"features.{i}.bias"] = b_shape
    _check_shapes(sd, want, source)
    out = {}
    for key in want:
        _, index, name = key.split(".")
        out[f"net.slice{_slice_of(int(index))}.{index}.{name}"] = sd[key].detach().to(torch.float32).contiguous()
    return out


def _pick_lins(sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    want = {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)}
    _check_shapes(sd, want, source)
    return {k: sd[k].detach().to(torch.float32).contiguous() for k in want}
