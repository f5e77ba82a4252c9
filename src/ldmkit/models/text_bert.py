"""Latent Diffusion's BERT-style conditioner: a small pre-norm Transformer encoder trained from scratch.

LDM's text-to-image (``txt2img-1p4B``) and layout-to-image (``layout2img-openimages256``) models condition
the UNet on the output of ``BERTEmbedder`` (CompVis ``ldm/modules/encoders/modules.py``): token ids go
through a ``TransformerWrapper`` around an ``Encoder`` from the x-transformers copy vendored as
``ldm/modules/x_transformer.py``, and the embeddings after the final LayerNorm are the cross-attention
context. "BERT" names only the tokenizer (``bert-base-uncased`` WordPiece); the network is not BERT.

This file rebuilds exactly the configuration LD uses, with the module tree of the reference so checkpoints
load under ``cond_stage_model.`` without renaming:

    transformer.token_emb                       Embedding(num_tokens, dim)
    transformer.pos_emb.emb                     Embedding(max_seq_len, dim), learned absolute positions
    transformer.attn_layers.layers.{2i}         [LayerNorm, Attention, Residual]    ('a' block)
    transformer.attn_layers.layers.{2i+1}       [LayerNorm, FeedForward, Residual]  ('f' block)
    transformer.norm                            final LayerNorm
    transformer.to_logits                       Linear(dim, num_tokens); in the checkpoint, unused here

Each block is pre-norm: ``x = x + block(norm(x))``. Attention has 8 heads of 64 channels whatever the
width (x-transformers defaults LD does not override), bias-free q/k/v projections and a biased output
projection. The feed-forward is Linear(dim, 4 dim) -> GELU (exact, erf) -> Linear(4 dim, dim), no GLU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AbsolutePositionalEmbedding",
    "Attention",
    "BERTEmbedder",
    "Encoder",
    "FeedForward",
    "Residual",
    "TransformerWrapper",
]


class AbsolutePositionalEmbedding(nn.Module):
    """Learned position vectors for positions 0..L-1 -> [1, L, dim] (broadcast over the batch)."""

    def __init__(self, dim: int, max_seq_len: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=init_std)  # the reference's 0.02, not nn.Embedding's N(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None]  # [1, L, dim]


class Attention(nn.Module):
    """Multi-head self-attention over all positions (no causal mask, no padding mask)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head  # 512 for LD's configs, independent of dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        # [B, L, heads * dim_head] -> [B, heads, L, dim_head]
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        # softmax(q k^T / sqrt(dim_head)) v, the reference's scale
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)  # [B, heads, L, dim_head] -> [B, L, heads * dim_head]
        return self.to_out(out)


class FeedForward(nn.Module):
    """Position-wise MLP. ``net`` = [[Linear, GELU], Dropout, Linear]: the nesting gives the reference keys
    ``net.0.0.*`` and ``net.2.*``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()),
            nn.Dropout(dropout),
            nn.Linear(inner, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Residual(nn.Module):
    """``out + residual``. Parameter-free; kept as a module so each layer is the reference's
    [norm, block, residual] triple and the indices stay the same."""

    def forward(self, out: Tensor, residual: Tensor) -> Tensor:
        return out + residual


class Encoder(nn.Module):
    """``depth`` pairs of pre-norm (attention, feed-forward) blocks, bidirectional."""

    def __init__(self, dim: int, depth: int, heads: int = 8, dim_head: int = 64, ff_mult: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.layer_types: tuple[str, ...] = ("a", "f") * depth
        self.layers = nn.ModuleList()
        for kind in self.layer_types:
            block = Attention(dim, heads=heads, dim_head=dim_head) if kind == "a" else FeedForward(dim, mult=ff_mult)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), block, Residual()]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            # Every entry is the [norm, block, residual] ModuleList built in __init__; ModuleList types its
            # items only as Module, so the cast says which.
            norm, block, residual = cast(nn.ModuleList, layer)
            x = residual(block(norm(x)), x)
        return x


class TransformerWrapper(nn.Module):
    """Token ids [B, L] -> embeddings [B, L, dim] (``return_embeddings=True``) or logits [B, L, num_tokens]."""

    def __init__(
        self,
        num_tokens: int,
        max_seq_len: int,
        dim: int,
        depth: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        emb_dropout: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=init_std)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len, init_std)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = Encoder(dim, depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult)
        self.norm = nn.LayerNorm(dim)
        # Only an MLM-style training objective would use the logits; LD never does, but the head is created
        # (and saved) by the reference, so it exists here for strict checkpoint loading.
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, tokens: Tensor, return_embeddings: bool = False) -> Tensor:
        x = self.token_emb(tokens) + self.pos_emb(tokens)  # [B, L, dim]
        x = self.emb_dropout(x)
        x = self.norm(self.attn_layers(x))
        return x if return_embeddings else self.to_logits(x)


class TextTokenizer(Protocol):
    """What ``BERTEmbedder.encode_text`` needs, e.g. ``ldmkit.text.wordpiece.WordPieceTokenizer``."""

    def __call__(self, texts: str | Sequence[str], max_length: int = ...) -> Tensor: ...


class BERTEmbedder(nn.Module):
    """LD's ``cond_stage_model`` for text (``txt2img-1p4B``: n_embed 1280, n_layer 32) and layouts
    (``layout2img``: n_embed 512, n_layer 16, vocab_size 8192, max_seq_len 92, use_tokenizer False).

    ``forward(token_ids [B, L]) -> [B, L, n_embed]`` with ``L <= max_seq_len``: the final-LayerNorm outputs,
    one context vector per token, padding positions included. The tokenizer is not part of the module (it
    holds no tensors); ``encode_text`` takes one, ``use_tokenizer`` records whether the config expects text.
    """

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if min(n_embed, n_layer, vocab_size, max_seq_len) <= 0:
            raise ValueError(
                f"n_embed, n_layer, vocab_size and max_seq_len must be positive, got "
                f"{n_embed}, {n_layer}, {vocab_size}, {max_seq_len}"
            )
        self.n_embed = n_embed
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.use_tokenizer = use_tokenizer
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size, max_seq_len=max_seq_len, dim=n_embed, depth=n_layer, emb_dropout=embedding_dropout,
            init_std=init_std,
        )

    def forward(self, token_ids: Tensor) -> Tensor:
        """``token_ids``: integer ids [B, L] in [0, vocab_size), L <= max_seq_len -> [B, L, n_embed].

        No attention mask is applied, as in LD: ``[PAD]`` positions are attended to like any token and get
        their own output vectors. Masking them would change the conditioning the released models learnt.
        """
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got dtype {token_ids.dtype}")
        if token_ids.ndim != 2:
            raise ValueError(f"token ids must have shape [B, L], got {tuple(token_ids.shape)}")
        if token_ids.shape[1] > self.max_seq_len:
            raise ValueError(
                f"sequence length {token_ids.shape[1]} exceeds max_seq_len {self.max_seq_len} "
                "(the learned position table has no rows beyond it)"
            )
        if not token_ids.is_meta and token_ids.numel() > 0:
            bad = (token_ids < 0) | (token_ids >= self.vocab_size)
            if bool(bad.any()):
                raise ValueError(
                    f"token id {int(token_ids[bad][0])} is out of range [0, {self.vocab_size}); "
                    "was the text tokenised with a different vocabulary?"
                )
        return self.transformer(token_ids.long(), return_embeddings=True)

    def encode_text(self, texts: str | Sequence[str], tokenizer: TextTokenizer) -> Tensor:
        """Texts -> ``tokenizer(texts, max_length=max_seq_len)`` [B, max_seq_len] -> [B, max_seq_len, n_embed]."""
        if not self.use_tokenizer:
            raise ValueError(
                "this BERTEmbedder was built with use_tokenizer=False (it takes token ids, e.g. layout "
                "tokens); call it with an id tensor instead of encode_text"
            )
        tokens = tokenizer(texts, max_length=self.max_seq_len)
        return self(tokens.to(self.transformer.token_emb.weight.device))
