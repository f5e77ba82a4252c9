"""Pictures while training: sample grids of the EMA denoiser and stage-1 reconstructions, at an interval.

They are what a user looks at first to see whether a run is learning; the loss of a diffusion model falls
long before its samples look like anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion.parameterization import DiscreteDenoiser, bind
from ..diffusion.samplers.ddim import sample_ddim
from ..diffusion.schedules import NoiseSchedule
from ..latent import LatentCodec
from ..models.autoencoder_kl import AutoencoderKL


def without_dropout(source: Any) -> Any:
    """The same condition source with condition dropout off: previews show the conditions they are given."""
    if source is None:
        return None
    if dataclasses.is_dataclass(source) and not isinstance(source, type) and hasattr(source, "drop_prob"):
        return dataclasses.replace(source, drop_prob=0.0)
    if hasattr(source, "sources"):
        return dataclasses.replace(source, sources=[without_dropout(s) for s in source.sources])
    return source


@torch.no_grad()
def preview_samples(net: nn.Module, codec: LatentCodec, schedule: NoiseSchedule, parameterization: str,
                    source: Any, n_data: int, latent_shape: tuple[int, int, int], *, n: int = 8, steps: int = 20,
                    seed: int = 0) -> Tensor:
    """n images [n, C, H, W] in [-1, 1]: deterministic DDIM from fixed noise, conditioned on the first n training
    examples' conditions (the same pictures at every interval, so they can be compared)."""
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % n_data
    src = without_dropout(source)
    cond = None if src is None else {k: v.to(device) for k, v in src.batch(idx, g).items()}
    x = torch.randn((n, *latent_shape), generator=g).to(device)
    was_training = net.training
    net.eval()
    try:
        z = sample_ddim(bind(DiscreteDenoiser(net, schedule, parameterization), cond), x, schedule, steps=steps)
        return codec.decode(z).clamp(-1, 1).float().cpu()
    finally:
        net.train(was_training)


@torch.no_grad()
def preview_reconstructions(ae: nn.Module, images: Tensor) -> Tensor:
    """Originals above their reconstructions (posterior mode / quantised codes): [2n, C, H, W]."""
    was_training = ae.training
    ae.eval()
    try:
        device = next(ae.parameters()).device
        x = images.to(device)
        rec = ae(x, sample_posterior=False)[0] if isinstance(ae, AutoencoderKL) else ae(x)[0]
        return torch.cat([images.cpu(), rec.clamp(-1, 1).float().cpu()])
    finally:
        ae.train(was_training)
