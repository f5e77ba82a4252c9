"""The conditional diffusion UNet of latent diffusion (Rombach et al. 2022, Sec. 3.3 and Appendix).

This is the ADM UNet (Dhariwal & Nichol 2021) with CompVis' ``SpatialTransformer`` cross-attention, built so
that its ``state_dict`` keys equal those of CompVis / Stability-AI ``UNetModel``: released LDM and Stable
Diffusion UNet weights (prefix ``model.diffusion_model.`` stripped) load with ``strict=True``.

Layout (``ds`` = downsampling factor, attention wherever ``ds in attention_resolutions``)::

    time_embed:    Linear(mc, 4mc) - SiLU - Linear(4mc, 4mc) on the sinusoidal embedding of t
    label_emb:     (class-conditional only) added to the time embedding
    input_blocks:  conv_in, then per level num_res_blocks x [ResBlock (+ attention)], then a Downsample
                   (every level but the last)
    middle_block:  ResBlock - attention - ResBlock
    output_blocks: per level (reversed) num_res_blocks + 1 x [concat skip, ResBlock (+ attention)], the last
                   one of every level but level 0 followed by an Upsample
    out:           GroupNorm - SiLU - conv (zero-initialised); ``id_predictor`` instead when ``n_embed``

Inference options, all off by default and measured in ``benchmarks/unet_options.py``: ``fuse_qkv_projections``
(one matmul for q, k, v of every self-attention), ``set_attention_slice`` (SDPA over a few heads at a time),
and ``.to(memory_format=torch.channels_last)`` (the layers keep that layout end to end). ``torch.compile`` of
the model gives the eager outputs (tests/test_unet_optimisations.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from ldmkit.nn.attention import (
    AttentionBlock,
    BasicTransformerBlock,
    CrossAttention,
    QKVAttention,
    QKVAttentionLegacy,
    SpatialTransformer,
    check_slice_size,
)
from ldmkit.nn.blocks import (
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    zero_module,
)
from ldmkit.nn.embeddings import timestep_embedding

__all__ = ["UNetConfig", "UNetModel"]


def _weight_dtype(layer: nn.Module) -> torch.dtype:
    """``layer.weight.dtype`` of a Linear or conv layer reached by indexing a container (typed as Module)."""
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return weight.dtype


@dataclass
class UNetConfig:
    """Constructor arguments of the reference ``UNetModel``, with the same names and defaults."""

    # fmt: off
    image_size: int | None                                 # nominal input size; unused at runtime
    in_channels: int                                       # channels of the (latent) input
    model_channels: int                                    # base width; time embedding is 4x this
    out_channels: int                                      # channels of the prediction
    num_res_blocks: int | Sequence[int]                    # ResBlocks per level (int, or one per level)
    attention_resolutions: Sequence[int]                   # downsampling factors ds that get attention
    dropout: float = 0.0                                   # dropout inside ResBlocks and transformer blocks
    channel_mult: Sequence[int] = (1, 2, 4, 8)             # width multiplier per level
    conv_resample: bool = True                             # learned conv resampling (else pool / nearest)
    dims: int = 2                                          # signal dimensionality; only 2 is supported
    num_classes: int | str | None = None                   # int (label table), "continuous" or "sequential"
    use_checkpoint: bool = False                           # activation checkpointing while training
    use_fp16: bool = False                                 # torso input cast to float16 (autocast or .half())
    use_bf16: bool = False                                 # same with bfloat16
    num_heads: int = -1                                    # fixed head count (or -1)
    num_head_channels: int = -1                            # fixed width per head (or -1); wins over num_heads
    num_heads_upsample: int = -1                           # decoder AttentionBlock heads; -1 = num_heads
    use_scale_shift_norm: bool = False                     # FiLM-style (scale, shift) time conditioning
    resblock_updown: bool = False                          # resample with ResBlocks instead of Down/Upsample
    use_new_attention_order: bool = False                  # AttentionBlock splits qkv before heads
    use_spatial_transformer: bool = False                  # SpatialTransformer instead of AttentionBlock
    transformer_depth: int = 1                             # BasicTransformerBlocks per SpatialTransformer
    context_dim: int | Sequence[int] | None = None         # cross-attention context width (or one per depth)
    n_embed: int | None = None                             # predict VQ codebook logits with id_predictor
    legacy: bool = True                                    # reference quirk in how dim_head is derived
    disable_self_attentions: Sequence[bool] | None = None  # per level: attn1 attends to the context
    num_attention_blocks: Sequence[int] | None = None      # per level: attention only in the first n blocks
    disable_middle_self_attn: bool = False                 # as disable_self_attentions, for the middle block
    use_linear_in_transformer: bool = False                # Linear (SD 2.x) instead of 1x1 conv proj_in/out
    adm_in_channels: int | None = None                     # input width of the "sequential" label embedding
    # fmt: on

    def __post_init__(self) -> None:
        self.validate()

    @property
    def res_blocks_per_level(self) -> list[int]:
        """``num_res_blocks`` expanded to one entry per level."""
        if isinstance(self.num_res_blocks, int):
            return [self.num_res_blocks] * len(self.channel_mult)
        return list(self.num_res_blocks)

    def validate(self) -> None:
        """Raise ValueError for settings the reference rejects or cannot run."""
        if self.dims != 2:
            raise ValueError(f"only 2-D UNets are supported (dims=2), got dims={self.dims}")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels (both are -1)")
        if self.use_spatial_transformer and self.context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the cross-attention width)")
        if self.context_dim is not None and not self.use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer=False; cross-attention needs it")
        if not isinstance(self.context_dim, int | None) and len(self.context_dim) != self.transformer_depth:
            raise ValueError("a context_dim list needs one entry per transformer block (transformer_depth)")
        if not isinstance(self.num_res_blocks, int) and len(self.num_res_blocks) != len(self.channel_mult):
            raise ValueError(
                "num_res_blocks must be an int or a list with one entry per level (len(channel_mult))"
            )
        if self.disable_self_attentions is not None and len(self.disable_self_attentions) != len(
            self.channel_mult
        ):
            raise ValueError("disable_self_attentions needs one entry per level (len(channel_mult))")
        if self.num_attention_blocks is not None:
            per_level = self.res_blocks_per_level
            if len(self.num_attention_blocks) != len(per_level):
                raise ValueError("num_attention_blocks needs one entry per level (len(channel_mult))")
            if any(n > r for n, r in zip(self.num_attention_blocks, per_level, strict=True)):
                raise ValueError("num_attention_blocks[i] may not exceed num_res_blocks[i]")
        if isinstance(self.num_classes, str):
            if self.num_classes not in ("continuous", "sequential"):
                raise ValueError(
                    f"num_classes must be an int, 'continuous' or 'sequential', got {self.num_classes!r}"
                )
        elif not (self.num_classes is None or isinstance(self.num_classes, int) and self.num_classes > 0):
            raise ValueError(f"num_classes must be a positive int or a string, got {self.num_classes!r}")
        if self.num_classes == "sequential" and self.adm_in_channels is None:
            raise ValueError("num_classes='sequential' needs adm_in_channels (the width of the y vector)")
        if self.adm_in_channels is not None and self.num_classes != "sequential":
            raise ValueError("adm_in_channels is only used with num_classes='sequential'")
        if self.use_fp16 and self.use_bf16:
            raise ValueError("use_fp16 and use_bf16 are mutually exclusive")
        if self.n_embed is not None and self.n_embed <= 0:
            raise ValueError(f"n_embed must be positive, got {self.n_embed}")

    def attention_heads(self, ch: int) -> tuple[int, int]:
        """(num_heads, dim_head) of an attention layer at width ``ch``, derived as the reference does."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:
            # legacy=True: dim_head is ch // heads for transformers; for AttentionBlocks it is
            # num_head_channels (-1 means "use num_heads").
            dim_head = ch // heads if self.use_spatial_transformer else self.num_head_channels
        return heads, dim_head


class UNetModel(nn.Module):
    """Time- (and optionally class- / context-) conditioned UNet; ``forward(x, timesteps, context, y)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        cfg = config
        self.model_channels = mc = cfg.model_channels
        self.num_classes = cfg.num_classes
        self.predict_codebook_ids = cfg.n_embed is not None
        self.dtype = torch.bfloat16 if cfg.use_bf16 else torch.float16 if cfg.use_fp16 else torch.float32
        time_embed_dim = 4 * mc
        heads_upsample = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        res_blocks = cfg.res_blocks_per_level

        def resblock(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                cfg.dropout,
                out_channels=ch_out,
                use_scale_shift_norm=cfg.use_scale_shift_norm,
                use_checkpoint=cfg.use_checkpoint,
                up=up,
                down=down,
            )

        def attention(ch: int, level: int | None, attn_block_heads: int | None = None) -> nn.Module:
            # level None = middle block. attn_block_heads: num_heads passed to an AttentionBlock
            # (the decoder passes num_heads_upsample, the encoder and middle block num_heads).
            heads, dim_head = cfg.attention_heads(ch)
            if not cfg.use_spatial_transformer:
                return AttentionBlock(
                    ch,
                    num_heads=heads if attn_block_heads is None else attn_block_heads,
                    num_head_channels=dim_head,
                    use_checkpoint=cfg.use_checkpoint,
                    use_new_attention_order=cfg.use_new_attention_order,
                )
            if level is None:
                disable_sa = cfg.disable_middle_self_attn
            else:
                disable_sa = bool(cfg.disable_self_attentions and cfg.disable_self_attentions[level])
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=cfg.transformer_depth,
                dropout=cfg.dropout,
                context_dim=cfg.context_dim,
                disable_self_attn=disable_sa,
                use_linear=cfg.use_linear_in_transformer,
                use_checkpoint=cfg.use_checkpoint,
            )

        def wants_attention(ds: int, level: int, index: int) -> bool:
            # attention_resolutions decides; num_attention_blocks can only remove blocks.
            limit = cfg.num_attention_blocks
            return ds in cfg.attention_resolutions and (limit is None or index < limit[level])

        # Timestep (and label) embedding.
        self.time_embed = nn.Sequential(
            nn.Linear(mc, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if isinstance(cfg.num_classes, int):
            self.label_emb: nn.Module = nn.Embedding(cfg.num_classes, time_embed_dim)
        elif cfg.num_classes == "continuous":
            self.label_emb = nn.Linear(1, time_embed_dim)
        elif cfg.num_classes == "sequential":
            assert cfg.adm_in_channels is not None  # checked by validate()
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(cfg.adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )

        # Encoder.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        )
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for nr in range(res_blocks[level]):
                layers: list[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if wants_attention(ds, level, nr):
                    layers.append(attention(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down: nn.Module
                if cfg.resblock_updown:
                    down = resblock(ch, ch, down=True)
                else:
                    down = Downsample(ch, cfg.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        # Bottleneck.
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch, None), resblock(ch, ch))

        # Decoder: every block first concatenates the matching encoder output.
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(res_blocks[level] + 1):
                layers = [resblock(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if wants_attention(ds, level, i):
                    layers.append(attention(ch, level, attn_block_heads=heads_upsample))
                if level and i == res_blocks[level]:
                    layers.append(
                        resblock(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)),
        )
        if cfg.n_embed is not None:
            # VQ-logits head (LDM "predict_cids"): per-pixel logits over the first stage's codebook.
            self.id_predictor = nn.Sequential(normalization(ch), nn.Conv2d(mc, cfg.n_embed, 1))

    # ------------------------------------------------------------------------------------------------------
    # Inference options (see the module docstring); none changes the parameters or the state_dict keys.

    def fuse_qkv_projections(self) -> int:
        """Compute q, k and v of every self-attention (``attn1`` without a context) in one matmul.

        The to_q/to_k/to_v parameters stay as they are; their concatenation is cached for no-grad use and
        rebuilt after any weight change (see ``CrossAttention._qkv_weight``). Returns the number of layers
        switched: cross-attention (``attn2``, and ``attn1`` under disable_self_attn) reads k, v from the
        context, so it keeps separate projections.
        """
        count = 0
        for module in self.modules():
            if isinstance(module, BasicTransformerBlock) and not module.disable_self_attn:
                module.attn1.fuse_qkv, module.attn1._qkv_cache = True, None
                count += 1
        return count

    def unfuse_qkv_projections(self) -> None:
        """Back to three projections; frees the cached concatenated weights."""
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.fuse_qkv, module._qkv_cache = False, None

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Compute every attention ``slice_size`` (batch, head) maps at a time; None turns slicing off.

        Caps the memory of attention backends that materialise the score matrix; the outputs are unchanged.
        Applies to the SpatialTransformer and the ADM AttentionBlock layers.
        """
        check_slice_size(slice_size)
        for module in self.modules():
            if isinstance(module, CrossAttention | QKVAttention | QKVAttentionLegacy):
                module.slice_size = slice_size

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | list[Tensor] | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """Predict from ``x`` [B, C_in, H, W] at ``timesteps`` [B] (or a scalar).

        ``context`` [B, M, context_dim] feeds cross-attention; ``y`` holds class labels [B] (int
        ``num_classes``), [B, 1] values ("continuous") or [B, adm_in_channels] vectors ("sequential").
        Returns [B, C_out, H, W], or codebook logits [B, n_embed, H, W] when ``n_embed`` is set.
        """
        batch = x.shape[0]
        if y is not None and self.num_classes is None:
            raise ValueError("y (class labels) was given, but this UNet has num_classes=None (unconditional)")
        if y is None and self.num_classes is not None:
            raise ValueError(f"this UNet is class-conditional (num_classes={self.num_classes!r}); pass y")
        if context is not None and not self.config.use_spatial_transformer:
            raise ValueError("context was given, but this UNet has no cross-attention layers")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)  # [B]
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must have shape [{batch}], got {tuple(timesteps.shape)}")

        t_emb = timestep_embedding(timesteps, self.model_channels)  # [B, mc]
        emb = self.time_embed(t_emb.to(_weight_dtype(self.time_embed[0])))  # [B, 4mc]
        if y is not None:
            if y.shape[0] != batch:
                raise ValueError(f"y has batch size {y.shape[0]} but x has {batch}")
            emb = emb + self.label_emb(y)  # [B, 4mc]

        skips: list[Tensor] = []
        # use_fp16/bf16 (CompVis) casts the torso input; otherwise follow the weights, so that a UNet moved
        # with .half() / .to(torch.bfloat16) takes fp32 inputs as diffusers' does
        # input_blocks[0] is TimestepEmbedSequential(conv_in); ModuleList types its items only as Module
        conv_in = cast(TimestepEmbedSequential, self.input_blocks[0])[0]
        h = x.to(self.dtype if self.dtype != torch.float32 else _weight_dtype(conv_in))
        if isinstance(context, Tensor):
            context = context.to(h.dtype)
        elif context is not None:
            context = [c.to(h.dtype) for c in context]
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # [B, C + C_skip, H, W]
            h = module(h, emb, context)
        head = self.id_predictor if self.predict_codebook_ids else self.out
        h = h.to(x.dtype if self.dtype != torch.float32 else head[-1].weight.dtype)  # CompVis: the head stays fp32
        return head(h).to(x.dtype)
