"""PatchGAN discriminator of the stage-1 losses (pix2pix, Isola et al. 2017; as in taming-transformers).

Layout for ``n_layers = 3`` (the reference default), with ``main.N`` indices as in the reference:

    main.0  Conv 4x4 s2 (input_nc -> ndf, bias)           main.1  LeakyReLU(0.2)
    main.2  Conv 4x4 s2 (ndf -> 2 ndf, no bias)           main.3  BatchNorm2d    main.4  LeakyReLU
    main.5  Conv 4x4 s2 (2 ndf -> 4 ndf, no bias)         main.6  BatchNorm2d    main.7  LeakyReLU
    main.8  Conv 4x4 s1 (4 ndf -> 8 ndf, no bias)         main.9  BatchNorm2d    main.10 LeakyReLU
    main.11 Conv 4x4 s1 (8 ndf -> 1, bias)                -> one logit per overlapping patch

Widths double per block up to 8 ndf. Convs followed by BatchNorm have no bias (its shift makes one
redundant); with ``use_actnorm`` the norm is ActNorm and every conv keeps its bias, as in the reference.
A 3-layer discriminator needs inputs of at least 32x32 (a 32x32 image gives a 2x2 logit map).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` initialised from the first training batch (Glow, Kingma 2018).

    Keys ``loc``, ``scale`` [1, C, 1, 1] and ``initialized`` (uint8 scalar), as taming's ``ActNorm``.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.initialized: Tensor
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*H*W)
        self.loc.copy_(-flat.mean(dim=1)[None, :, None, None])
        self.scale.copy_(1.0 / (flat.std(dim=1)[None, :, None, None] + 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.initialized.item() == 0:
            self._initialize(x)  # zero mean, unit std per channel on the first batch
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: image (B, input_nc, H, W) -> patch logits (B, 1, H', W')."""

    def __init__(
        self,
        input_nc: int = 3,        # image channels
        ndf: int = 64,            # width of the first conv
        n_layers: int = 3,        # number of stride-2 convs
        use_actnorm: bool = False,  # ActNorm instead of BatchNorm2d
    ) -> None:
        super().__init__()
        if n_layers < 0 or ndf < 1 or input_nc < 1:
            raise ValueError(f"need input_nc >= 1, ndf >= 1, n_layers >= 0; got {input_nc}, {ndf}, {n_layers}")
        norm_layer: type[nn.Module] = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # a conv right before BatchNorm gets no bias
        kw, padw = 4, 1
        seq: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers):  # stride-2 blocks, widths ndf * 2^n capped at 8 ndf
            mult_prev, mult = mult, min(2**n, 8)
            seq += [
                nn.Conv2d(ndf * mult_prev, ndf * mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        mult_prev, mult = mult, min(2**n_layers, 8)
        seq += [  # one stride-1 block
            nn.Conv2d(ndf * mult_prev, ndf * mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias),
            norm_layer(ndf * mult),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        seq.append(nn.Conv2d(ndf * mult, 1, kernel_size=kw, stride=1, padding=padw))  # 1 logit per patch
        self.main = nn.Sequential(*seq)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _normal_(t: Tensor, mean: float, std: float, generator: torch.Generator) -> None:
    draw = torch.randn(t.shape, generator=generator, dtype=torch.float32, device=generator.device)
    with torch.no_grad():
        t.copy_(draw * std + mean)


def weights_init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """The reference DCGAN init, drawn from ``generator`` only (the global RNG is not touched).

    Conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias = 0. Conv biases keep PyTorch's default
    distribution U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the reference (which leaves them alone), but are
    redrawn from ``generator`` so the whole discriminator is a function of the generator's state.
    ActNorm is left as constructed. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            _normal_(m.weight, 0.0, 0.02, generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                draw = torch.rand(m.bias.shape, generator=generator, device=generator.device)
                with torch.no_grad():
                    m.bias.copy_(draw * 2 * bound - bound)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            _normal_(m.weight, 1.0, 0.02, generator)
            with torch.no_grad():
                m.bias.zero_()
    return module
