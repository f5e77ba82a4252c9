"""Layouts: lists of (class, x0, y0, x1, y1) boxes, tokenized and read by a BERT through cross-attention
(LDM's layout-to-image model on OpenImages / COCO; `LayoutTokenizer` quantises the boxes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..config import LDMConfig
from ..latent import LatentCodec
from ..text.layout import LayoutTokenizer
from .base import ConditionKind, ConditionRoles, SampleConditions, need
from .sources import ConditionSource, TokenCondition


def layout_tokenizer(cfg: LDMConfig) -> LayoutTokenizer:
    """The LayoutTokenizer of a layout model: n_classes classes, layout_tokens coordinates, layout_objects slots."""
    c = cfg.conditioning
    return LayoutTokenizer(c.n_classes, no_tokens=c.layout_tokens, max_objects=c.layout_objects)


class Layout(ConditionKind):
    name = "layout"
    takes = frozenset({"layouts"})
    description = "it is a layout-to-image model"

    def module(self, cfg: LDMConfig, *, pretrained: bool = True) -> nn.Module:
        from ..models.text_bert import BERTEmbedder

        c, tok = cfg.conditioning, layout_tokenizer(cfg)
        return BERTEmbedder(n_embed=c.embed_dim, n_layer=c.n_layer, vocab_size=tok.vocab_size,
                            max_seq_len=tok.seq_len, use_tokenizer=False, init_std=c.init_std)

    def roles(self, cfg: LDMConfig) -> ConditionRoles:
        return ConditionRoles(text=False, layout=True, concat_inpaint=False)

    def training_source(self, cfg: LDMConfig, data: Any, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> ConditionSource:
        layouts = need(data.layouts, "layouts", cfg)
        tok = layout_tokenizer(cfg)
        return TokenCondition(tok.encode(layouts), tok.null_tokens(1)[0], cfg.train_diffusion.cond_drop_prob)

    def sample(self, cfg: LDMConfig, codec: LatentCodec, inputs: Any, count: int,
               encode_prompts: Callable[[Sequence[str]], Tensor]) -> SampleConditions:
        if inputs.layouts is None:
            raise ValueError("this is a layout-to-image model: give layouts, lists of (class, x0, y0, x1, y1)")
        tok = layout_tokenizer(cfg)
        return SampleConditions({"labels": tok.encode([list(map(tuple, lay)) for lay in inputs.layouts])},
                                {"labels": tok.null_tokens(count)})


class LayoutBERT(Layout):
    """An original LD layout checkpoint: kind "bert" with use_tokenizer false (token ids, not text)."""

    name = "bert"

    def module(self, cfg: LDMConfig, *, pretrained: bool = True) -> nn.Module:
        from .text import bert_module

        return bert_module(cfg, pretrained)

    def training_source(self, cfg: LDMConfig, data: Any, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> ConditionSource:
        raise ValueError("a bert conditioner with use_tokenizer false takes layout tokens: use kind 'layout'")


KIND = Layout()
BERT_TOKENS = LayoutBERT()
