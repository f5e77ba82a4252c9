"""What every conditioning kind provides, and the shared pieces of their sampling requests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import LDMConfig
from ..latent import LatentCodec
from .sources import ConditionSource

if TYPE_CHECKING:  # the data set type only annotates; the data layer is not needed to sample
    from ..data.datasets import TaskData

# the request fields a kind may read; an image with a mask (inpainting) or a strength (img2img) is for every kind
REQUEST_FIELDS = {"classes": "class labels", "prompts": "prompts", "layouts": "layouts",
                  "segmap": "segmap (semantic map)", "lowres": "low-res image"}


@dataclass(frozen=True)
class ConditionRoles:
    """What a model's condition takes from a user: prompts, layouts, and an inpainting input."""

    text: bool  # prompts (CLIP, OpenCLIP, MiniLM, or LD's BERT with its tokenizer)
    layout: bool  # (class, box) lists (LD's layout model: BERT without a tokenizer)
    concat_inpaint: bool  # the masked image is concatenated (LD's inpainting model, SD inpainting)


@dataclass
class SampleConditions:
    """A request's keyword tensors for the conditioned UNet: `cond`, and `uncond` for classifier-free guidance."""

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None  # None: no unconditional branch for this request (guidance must be 1)
    latent_hw: tuple[int, int] | None = None  # set when the condition fixes the sample's size (maps, low-res)
    no_guidance: str | None = None  # why guidance != 1 is refused


class ConditionKind:
    """One way of conditioning the UNet. Subclasses set the class attributes and override what applies."""

    name: str = ""  # the config's conditioning.kind
    takes: frozenset[str] = frozenset()  # the REQUEST_FIELDS a sampling request gives this kind
    description: str = ""  # how a refusal names the model: "it is class-conditional"
    frozen_encoder: bool = False  # a pretrained encoder whose context training computes once (not trained)

    # -- the module
    def module(self, cfg: LDMConfig, *, pretrained: bool = True) -> nn.Module | None:
        """The cond stage module; None when the condition has no weights (images, masks, nothing)."""
        return None

    # -- training
    def training_source(self, cfg: LDMConfig, data: TaskData, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> ConditionSource | None:
        """Keyword tensors for each training batch, from the data set (`encoder`: the frozen encoder, if any)."""
        raise ValueError(f"training with conditioning kind {self.name!r} is not supported (its encoder weights are "
                         "not available offline): use bert or minilm for text")

    # -- sampling
    def roles(self, cfg: LDMConfig) -> ConditionRoles:
        return ConditionRoles(text=False, layout=False, concat_inpaint=False)

    def sample(self, cfg: LDMConfig, codec: LatentCodec, inputs: Any, count: int,
               encode_prompts: Callable[[Sequence[str]], Tensor]) -> SampleConditions:
        """Check the request's fields for this kind and build its conditional and null tensors."""
        return SampleConditions({}, {})

    # -- front ends
    def tasks(self, cfg: LDMConfig) -> list[str]:
        """The web page's tabs for such a model."""
        return ["inpaint"] if self.roles(cfg).concat_inpaint else ["generate", "img2img", "inpaint"]

    def refuse_others(self, cfg: LDMConfig, given: set[str]) -> None:
        """One clear error for a request field this kind does not read."""
        for name in sorted(given - self.takes, key=lambda n: list(REQUEST_FIELDS).index(n) if n in REQUEST_FIELDS
                           else len(REQUEST_FIELDS)):
            if name in ("image", "mask"):
                continue  # every model takes a picture (img2img, inpainting); the pipeline checks it
            raise ValueError(f"this model ({cfg.conditioning.kind!r} conditioning) takes no "
                             f"{REQUEST_FIELDS.get(name, name)}: {self.description}")


def null_labels(count: int, n_classes: int) -> Tensor:
    """[count] of the null class (index n_classes): the unconditional branch of a class model."""
    return torch.full((count,), n_classes, dtype=torch.long)


def need(value: Any, what: str, cfg: LDMConfig) -> Any:
    """A data set's condition, or an error naming what the kind needs and which data sets carry it."""
    if value is None:
        raise ValueError(f"conditioning kind {cfg.conditioning.kind!r} needs {what}, but data {cfg.data.name!r} "
                         "has none (emoji has captions; canvases have layouts and segmaps; mnist has labels)")
    return value


UNGUIDED = ("this model ({kind!r} conditioning) learnt no unconditional branch (its spatial condition is never "
            "dropped in training), so classifier-free guidance is not available: use guidance 1")


def side(size: int, f: int, what: str) -> int:
    """The latent side of an image side, which must be a multiple of the autoencoder's factor `f`."""
    if size % f:
        raise ValueError(f"{what} size {size} is not divisible by the autoencoder's downsampling factor {f}")
    return size // f
