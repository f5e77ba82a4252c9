"""Stable Diffusion's frozen CLIP text encoders, with the reference checkpoints' parameter names.

SD 1.x conditions on OpenAI's CLIP ViT-L/14 text transformer, loaded through transformers 4.19
(``FrozenCLIPEmbedder``, CompVis/stable-diffusion ``ldm/modules/encoders/modules.py``); its checkpoint keys are
``cond_stage_model.transformer.text_model.*``. SD 2.x conditions on OpenCLIP's ViT-H/14 text tower
(``FrozenOpenCLIPEmbedder``, Stability-AI/stablediffusion), keys ``cond_stage_model.model.*``. Both are the same
network, a causal pre-LayerNorm transformer over 77 token positions; they differ in names, activation
(quick-GELU vs. GELU), fused vs. separate q/k/v projections, and in which layer SD reads out.

Module trees and registration order follow the references, so ``state_dict()`` reproduces their keys in
their order and original weights load by stripping the ``cond_stage_model.`` prefix. Nothing here imports
transformers or open_clip.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.text.clip_bpe import CLIPTokenizer

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextTransformer",
    "FrozenCLIPEmbedder",
    "FrozenOpenCLIPEmbedder",
    "OpenCLIPTextConfig",
    "OpenCLIPTextModel",
    "clip_text_keys_from_transformers",
]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (transformers' "quick_gelu")."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()  # exact (erf) GELU, as torch and open_clip default to
    raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {name!r}")


def _check_shape(width: int, heads: int, **positive: int) -> None:
    for name, value in {"width": width, "heads": heads, **positive}.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")


# ----------------------------------------------------------------------------------------------------------
# SD 1.x: OpenAI CLIP text model in the transformers 4.19 layout
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of transformers' ``CLIPTextModel``; the defaults are SD 1.x's ViT-L/14 text model."""

    vocab_size: int = 49408
    width: int = 768  # transformers: hidden_size
    layers: int = 12  # num_hidden_layers
    heads: int = 12  # num_attention_heads
    mlp_width: int = 3072  # intermediate_size
    max_positions: int = 77  # max_position_embeddings
    act: str = "quick_gelu"  # hidden_act
    eps: float = 1e-5  # layer_norm_eps

    def __post_init__(self) -> None:
        _check_shape(
            self.width,
            self.heads,
            vocab_size=self.vocab_size,
            layers=self.layers,
            mlp_width=self.mlp_width,
            max_positions=self.max_positions,
        )
        _activation(self.act)

    @classmethod
    def vit_l14(cls) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14's text model, SD 1.x's conditioner (``v1-inference.yaml``)."""
        return cls()


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)
        # transformers 4.19 saved this constant as a persistent int64 buffer, so SD 1.x checkpoints carry it.
        self.position_ids: Tensor
        self.register_buffer("position_ids", torch.arange(config.max_positions).expand(1, -1), persistent=True)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing: list[str],
        unexpected: list[str],
        errors: list[str],
    ) -> None:
        # Checkpoints saved by later transformers (5.x included: the buffer became non-persistent) omit
        # position_ids; they are arange(max_positions) by construction, so fill them in rather than fail a
        # strict load. Some merged SD 1.x checkpoints store them as float with rounding error (76.9999...),
        # which a plain int copy would truncate; round instead.
        key = prefix + "position_ids"
        if key not in state_dict:
            state_dict[key] = torch.arange(self.position_ids.shape[1], device=self.position_ids.device)[None]
        elif state_dict[key].is_floating_point():
            state_dict[key] = state_dict[key].round().long()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = config.heads
        # Registered k, v, q, out as in transformers, so state_dict order matches SD 1.x checkpoints.
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.q_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        split = (b, n, self.heads, c // self.heads)
        q = self.q_proj(x).view(split).transpose(1, 2)  # [B, H, N, D]
        k = self.k_proj(x).view(split).transpose(1, 2)
        v = self.v_proj(x).view(split).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(D) + causal) v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.act = _activation(config.act)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    """transformers 4.19's ``CLIPTextTransformer``: embeddings, causal encoder, final LayerNorm."""

    def __init__(self, config: CLIPTextConfig | None = None) -> None:
        super().__init__()
        self.config = config or CLIPTextConfig()
        self.embeddings = CLIPTextEmbeddings(self.config)
        self.encoder = CLIPEncoder(self.config)
        self.final_layer_norm = nn.LayerNorm(self.config.width, eps=self.config.eps)

    def forward(self, input_ids: Tensor, layer: int = -1, final_norm: bool = True) -> Tensor:
        """Token ids [B, N<=max_positions] -> hidden states [B, N, width].

        ``layer`` indexes transformers' ``hidden_states`` tuple: 0 is the embedding output, i the output of
        encoder layer i, negative values count from the end (-1 the last layer, -2 the penultimate). Only the
        layers up to it are run. ``final_norm`` applies ``final_layer_norm`` to the result.
        Defaults give ``last_hidden_state`` (SD 1.x). "Clip skip 2" as in A1111/diffusers is
        ``layer=-2, final_norm=True``; transformers' ``hidden_states[k]`` is ``layer=k, final_norm=False``.
        """
        n_layers = len(self.encoder.layers)
        index = layer if layer >= 0 else n_layers + 1 + layer
        if not 0 <= index <= n_layers:
            raise ValueError(f"layer must be in [-{n_layers + 1}, {n_layers}], got {layer}")
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"input_ids must have shape [B, N] with N <= {self.config.max_positions}, got {tuple(input_ids.shape)}"
            )
        x = self.embeddings(input_ids)
        for block in self.encoder.layers[:index]:
            x = block(x)
        return self.final_layer_norm(x) if final_norm else x

    @staticmethod
    def pool(hidden: Tensor, input_ids: Tensor) -> Tensor:
        """Hidden state at each sequence's end-of-text token [B, width] (transformers' ``pooler_output``).

        transformers 4.19 locates it as the argmax of the ids: the end-of-text id 49407 is the largest id, and
        argmax returns its first occurrence, so EOT padding does not move it.
        """
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]


class CLIPTextModel(nn.Module):
    """The ``text_model`` level of transformers 4.19's ``CLIPTextModel``, kept so the keys say ``text_model.``."""

    def __init__(self, config: CLIPTextConfig | None = None) -> None:
        super().__init__()
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: Tensor, layer: int = -1, final_norm: bool = True) -> Tensor:
        return self.text_model(input_ids, layer=layer, final_norm=final_norm)


def clip_text_keys_from_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a transformers ``CLIPTextModel`` state dict to this module's ``CLIPTextModel`` keys.

    transformers 4.x names the tensors ``text_model.embeddings...``; transformers 5 dropped that level
    (``embeddings...``, ``encoder...``, ``final_layer_norm...``) and no longer saves ``position_ids``. Keys
    of either layout come back with the ``text_model.`` prefix; missing ``position_ids`` are filled at load.
    """
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith("text_model.") and key.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
            key = "text_model." + key
        renamed[key] = value
    return renamed


class FrozenCLIPEmbedder(nn.Module):
    """SD 1.x's cond stage: token ids [B, 77] -> cross-attention context [B, 77, 768].

    ``layer`` follows Stability's version of the class: "last" (``last_hidden_state``, CompVis SD 1.x),
    "pooled" (the end-of-text state, [B, 1, width]) or "hidden" (transformers' ``hidden_states[layer_idx]``,
    without the final LayerNorm). Parameters are frozen (``requires_grad=False``) unless ``freeze=False``.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        config: CLIPTextConfig | None = None,
        layer: str = "last",
        layer_idx: int | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.transformer = CLIPTextModel(config)
        config = self.transformer.text_model.config
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "hidden" and (layer_idx is None or abs(layer_idx) > config.layers):
            raise ValueError(f"layer='hidden' needs layer_idx with |layer_idx| <= {config.layers}, got {layer_idx}")
        self.layer = layer
        self.layer_idx = layer_idx
        self.max_length = config.max_positions
        if freeze:
            self.freeze()

    def freeze(self) -> FrozenCLIPEmbedder:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        text_model = self.transformer.text_model
        if self.layer == "hidden":
            return text_model(tokens, layer=self.layer_idx, final_norm=False)
        z = text_model(tokens)
        return text_model.pool(z, tokens)[:, None, :] if self.layer == "pooled" else z

    def encode(self, texts: str | Sequence[str], tokenizer: CLIPTokenizer) -> Tensor:
        """Tokenise as SD 1.x does (transformers, ``padding="max_length"``: end-of-text padding) and embed."""
        tokens = tokenizer(texts, context_length=self.max_length, pad="eos", truncate=True)
        return self(tokens.to(self.transformer.text_model.embeddings.token_embedding.weight.device))


# ----------------------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP text tower in the open_clip ``CLIP`` layout
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """Text half of an open_clip model config; the defaults are ViT-H-14's, SD 2.x's conditioner."""

    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 77
    embed_dim: int = 1024  # output width of text_projection (the joint image-text space)
    mlp_ratio: float = 4.0
    act: str = "gelu"  # ViT-H-14 does not set quick_gelu
    eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_shape(
            self.width,
            self.heads,
            vocab_size=self.vocab_size,
            layers=self.layers,
            context_length=self.context_length,
            embed_dim=self.embed_dim,
        )
        _activation(self.act)

    @classmethod
    def vit_h14(cls) -> OpenCLIPTextConfig:
        """open_clip ``ViT-H-14`` (laion2b_s32b_b79k), used by ``v2-inference*.yaml``."""
        return cls()

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-LayerNorm block around torch's ``nn.MultiheadAttention`` (fused in_proj)."""

    def __init__(self, config: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.eps)
        # batch_first changes only the call convention, not the parameters (in_proj_weight, out_proj).
        self.attn = nn.MultiheadAttention(config.width, config.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(config.width, config.mlp_width),
                gelu=_activation(config.act),
                c_proj=nn.Linear(config.mlp_width, config.width),
            )
        )

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class OpenCLIPTextModel(nn.Module):
    """open_clip ``CLIP`` with ``.visual`` deleted, as SD 2.x's embedder holds it.

    ``text_projection`` and ``logit_scale`` are unused for SD conditioning but are checkpoint keys, so they
    exist for strict loading.
    """

    def __init__(self, config: OpenCLIPTextConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or OpenCLIPTextConfig()
        # Own parameters first, then children in this order: the order of open_clip v2.0.2's state_dict.
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))  # CLIP's initial temperature
        self.transformer = OpenCLIPTransformer(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.ln_final = nn.LayerNorm(config.width, eps=config.eps)
        # Additive causal mask: -inf above the diagonal. Not a checkpoint key (persistent=False, as open_clip).
        mask = torch.full((config.context_length, config.context_length), float("-inf")).triu_(1)
        self.attn_mask: Tensor
        self.register_buffer("attn_mask", mask, persistent=False)
        nn.init.normal_(self.positional_embedding, std=0.01)  # open_clip's init scales; checkpoints overwrite
        nn.init.normal_(self.text_projection, std=config.width**-0.5)

    def forward(self, tokens: Tensor, skip_last: int = 0) -> Tensor:
        """Token ids [B, N<=context_length] -> ``ln_final`` of the output of all but the last ``skip_last`` blocks.

        Stability's ``encode_with_transformer``: skip_last 0 is layer "last", 1 is "penultimate"; ``ln_final``
        is applied in both cases.
        """
        n_blocks = len(self.transformer.resblocks)
        if not 0 <= skip_last < n_blocks:
            raise ValueError(f"skip_last must be in [0, {n_blocks}), got {skip_last}")
        if tokens.ndim != 2 or tokens.shape[1] > self.config.context_length:
            raise ValueError(
                f"tokens must have shape [B, N] with N <= {self.config.context_length}, got {tuple(tokens.shape)}"
            )
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]  # [B, N, width]
        mask = self.attn_mask[:n, :n].to(x.dtype)
        for block in self.transformer.resblocks[: n_blocks - skip_last]:
            x = block(x, mask)
        return self.ln_final(x)


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD 2.x's cond stage: token ids [B, 77] -> cross-attention context [B, 77, 1024].

    ``layer`` is "last" (the reference class's default) or "penultimate" (what every SD 2.x config sets).
    Parameters are frozen unless ``freeze=False``.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, config: OpenCLIPTextConfig | None = None, layer: str = "last", freeze: bool = True) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        self.model = OpenCLIPTextModel(config)
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)  # blocks skipped at the end
        self.max_length = self.model.config.context_length
        if freeze:
            self.freeze()

    def freeze(self) -> FrozenOpenCLIPEmbedder:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens, skip_last=self.layer_idx)

    def encode(self, texts: str | Sequence[str], tokenizer: CLIPTokenizer) -> Tensor:
        """Tokenise as ``open_clip.tokenize`` does (zero padding) and embed."""
        tokens = tokenizer(texts, context_length=self.max_length, pad="zero", truncate=True)
        return self(tokens.to(self.model.token_embedding.weight.device))
