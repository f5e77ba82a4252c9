"""The spatial inputs concatenated to the latent (LDM sec. 3.3, conditioning_key "concat" / "hybrid").

The same functions build them at training and at sampling time, so a trained model is sampled with exactly
what it learnt from: the low-resolution image of super-resolution, the masked-image latent and the mask of
inpainting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..latent import LatentCodec
from ..models.vq import VQModel


def lowres_concat(lowres: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """The super-resolution condition: the low-resolution image at the latent's size (LD's bsr_sr model
    concatenates the 64 px input to the 64 x 64 latent of a 256 px image; other factors are resized bicubically)."""
    if lowres.ndim != 4:
        raise ValueError(f"low-resolution input must be [B, C, h, w], got {tuple(lowres.shape)}")
    if tuple(lowres.shape[-2:]) == tuple(latent_hw):
        return lowres
    return F.interpolate(lowres, size=latent_hw, mode="bicubic", align_corners=False).clamp(-1, 1)


def masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """The known part of the image, holes (mask 1) set to 0 = mid grey, as LD's and SD's inpainting data."""
    return image * (1 - mask)


@torch.no_grad()
def clean_latents(codec: LatentCodec, images: Tensor) -> Tensor:
    """Scaled deterministic latents: the posterior mode (no sampling noise), or VQ pre-quantisation latents."""
    ae = codec.autoencoder
    images = images.to(next(ae.parameters()).device)  # training keeps data on the CPU, the first stage may be on a GPU
    return codec.scale(ae.encode(images) if isinstance(ae, VQModel) else codec.posterior(images).mode())


@torch.no_grad()
def inpaint_concat(codec: LatentCodec, image: Tensor, mask: Tensor, *, mask_first: bool = False) -> Tensor:
    """[B, C_z + 1, h, w]: the scaled latent of the masked image (posterior mode: no sampling noise) and the
    mask resized to the latent (nearest), in LD's order (latent, mask) or SD's (mask, latent)."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:] or mask.shape[0] != image.shape[0]:
        raise ValueError(f"mask must be [B, 1, H, W] matching the image {tuple(image.shape)}, got {tuple(mask.shape)}")
    z = clean_latents(codec, masked_image(image, mask))
    m = F.interpolate(mask.to(z.device, z.dtype), size=z.shape[-2:], mode="nearest")  # [B, 1, h, w]
    return torch.cat([m, z] if mask_first else [z, m], dim=1)


def image_batch(x: Tensor, what: str, channels: int) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [-1, 1]")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must be [B, {channels}, H, W] (this model has {channels} image channels), "
                         f"got {tuple(x.shape)}")
    if not torch.isfinite(x).all() or x.min() < -1.01 or x.max() > 1.01:
        raise ValueError(f"{what} must hold finite values in [-1, 1], got range [{float(x.min()):.3g}, "
                         f"{float(x.max()):.3g}]")
    return x.float().clamp(-1, 1)


def mask_batch(mask: Tensor, image: Tensor) -> Tensor:
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None] if mask.shape[0] == image.shape[0] and mask.shape[0] != 1 else mask[None]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask must be [B, 1, H, W] with the image's size {tuple(image.shape[-2:])}, "
                         f"got {tuple(mask.shape)}")
    if mask.shape[0] == 1 and image.shape[0] > 1:
        mask = mask.expand(image.shape[0], -1, -1, -1)
    mask = (mask.float() > 0.5).float()
    if not mask.any():
        raise ValueError("the mask is empty: mark the region to fill with 1 (white)")
    return mask
