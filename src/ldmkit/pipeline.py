"""Inference API: load a trained latent diffusion model and turn class labels into images.

    pipe = LatentDiffusionPipeline.from_pretrained("runs/demo")
    images = pipe.sample([3] * 16, seed=0)     # [16, C, H, W] in [-1, 1]; steps/guidance/eta from the config
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import LDMConfig, from_dict
from .diffusion import DiscreteDenoiser, guided_denoiser
from .diffusion.samplers.registry import resolve_sampler, run_sampler
from .latent import LatentCodec
from .training.build import (
    COND_STAGE_PREFIX,
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    LDMParts,
    build_autoencoder,
    build_conditioner,
    build_schedule,
    build_unet,
    load_strict,
    split_prefix,
)
from .training.checkpoint import CheckpointError, load_checkpoint
from .training.diffusion import WEIGHTS_FILE, Denoiser


class LatentDiffusionPipeline:
    """A frozen LDM: conditioner, UNet, schedule and the latent codec, ready to sample."""

    def __init__(self, cfg: LDMConfig, parts: LDMParts, scale_factor: float) -> None:
        self.cfg = cfg
        self.parts = parts
        self.codec = LatentCodec(parts.autoencoder, scale_factor).eval()
        self.net = Denoiser(parts.unet, parts.conditioner).eval()
        self.denoiser = DiscreteDenoiser(self.net, parts.schedule, cfg.parameterization)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LatentDiffusionPipeline:
        """Load from a run directory (its `ldm.safetensors`) or a checkpoint file."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_dir():
            if not (path / WEIGHTS_FILE).exists():
                raise CheckpointError(f"{path} holds no {WEIGHTS_FILE}: is it a finished ldmkit training run?")
            path = path / WEIGHTS_FILE
        tensors, meta = load_checkpoint(path)
        if meta.get("kind") != "ldm" or "config" not in meta:
            raise CheckpointError(f"{path} is not an ldmkit latent diffusion checkpoint (kind {meta.get('kind')!r})")
        cfg = from_dict(LDMConfig, meta["config"])
        parts = LDMParts(build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg), build_schedule(cfg))
        load_strict(parts.unet, split_prefix(tensors, UNET_PREFIX), "UNet")
        load_strict(parts.autoencoder, split_prefix(tensors, FIRST_STAGE_PREFIX), "autoencoder")
        if parts.conditioner is not None:
            load_strict(parts.conditioner, split_prefix(tensors, COND_STAGE_PREFIX), "conditioner")
        return cls(cfg, parts, float(meta["scale_factor"]))

    @property
    def n_classes(self) -> int:
        return self.cfg.conditioning.n_classes if self.cfg.conditioning.kind == "class" else 0

    @property
    def resolution(self) -> int:
        return self.cfg.data.resolution

    def check_params(self, classes: Sequence[int] | None, steps: int, guidance: float, eta: float | None,
                     sampler: str | None = None, guidance_rescale: float = 0.0) -> None:
        if classes is not None:
            if self.n_classes == 0:
                raise ValueError("this model is unconditional: it takes no class labels")
            bad = [c for c in classes if not 0 <= int(c) < self.n_classes]
            if bad:
                raise ValueError(f"class {bad[0]} is out of range: this model knows classes 0..{self.n_classes - 1}")
        if not 1 <= steps <= self.parts.schedule.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.parts.schedule.num_timesteps}, got {steps}")
        if not guidance >= 0 or guidance != guidance:
            raise ValueError(f"guidance must be a number >= 0, got {guidance}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if eta is not None and not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if sampler is not None:
            resolve_sampler(sampler)

    @torch.no_grad()
    def sample_latents(
        self,
        classes: Sequence[int] | None = None,
        n: int | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        eta: float | None = None,
        sampler: str | None = None,
        guidance_rescale: float | None = None,
        seed: int = 0,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        """Scaled latents for `classes` (one sample per entry) or `n` unconditional samples.

        sampler, steps, guidance, guidance_rescale and eta default to the sampling section of the model's
        config (its eta only goes with its sampler: another sampler without an explicit eta runs at its own
        default).
        """
        sc = self.cfg.sampling
        steps = sc.steps if steps is None else steps
        guidance = sc.guidance if guidance is None else guidance
        guidance_rescale = sc.guidance_rescale if guidance_rescale is None else guidance_rescale
        if eta is None and sampler is None:
            eta = sc.eta
        sampler = sc.sampler if sampler is None else sampler
        self.check_params(classes, steps, guidance, eta, sampler, guidance_rescale)
        count = len(classes) if classes is not None else n
        if not count or count < 1:
            raise ValueError("nothing to sample: give classes or n >= 1")
        gen = torch.Generator().manual_seed(seed)
        shape = (count, *self.codec.latent_shape(self.resolution))
        x_T = torch.randn(shape, generator=gen)
        if self.n_classes and classes is not None:
            y = torch.tensor([int(c) for c in classes], dtype=torch.long)
            cond = {"labels": y}
            uncond = {"labels": torch.full_like(y, self.n_classes)}  # the null class
            fn = guided_denoiser(self.denoiser, cond, uncond, guidance, guidance_rescale)
        elif self.n_classes:
            null = {"labels": torch.full((count,), self.n_classes, dtype=torch.long)}
            fn = guided_denoiser(self.denoiser, null, None, 1.0)
        else:
            fn = guided_denoiser(self.denoiser, {}, None, 1.0)
        return run_sampler(sampler, fn, x_T, self.parts.schedule, steps=steps, eta=eta, generator=gen,
                           callback=callback)

    @torch.no_grad()
    def sample(self, classes: Sequence[int] | None = None, n: int | None = None, *, batch_size: int = 256,
               **kwargs: Any) -> Tensor:
        """Images in [-1, 1], [N, C, H, W]; large requests run in batches (seeded per batch)."""
        seed = int(kwargs.pop("seed", 0))
        count = len(classes) if classes is not None else (n or 0)
        out = []
        for b, start in enumerate(range(0, max(count, 1), batch_size)):
            part = None if classes is None else list(classes)[start : start + batch_size]
            m = None if classes is not None else min(batch_size, count - start)
            z = self.sample_latents(part, m, seed=seed + b, **kwargs)
            out.append(self.codec.decode(z).clamp(-1, 1))
        return torch.cat(out)
