"""Every conditioning kind, by the name a config gives it. A new kind is one file and one line here."""

from __future__ import annotations

from ..config import LDMConfig
from . import class_label, inpaint, layout, none, semantic, superres, text
from .base import ConditionKind

KINDS: dict[str, ConditionKind] = {}


def register(kind: ConditionKind) -> ConditionKind:
    """Make `kind` what configs with `conditioning.kind: <kind.name>` use (a later kind of the same name wins)."""
    KINDS[kind.name] = kind
    return kind


for _kind in (none.KIND, class_label.KIND, text.CLIP, text.OPENCLIP, text.MINILM, text.BERT, layout.KIND,
              semantic.KIND, superres.KIND, inpaint.KIND):
    register(_kind)


def kind_of(cfg: LDMConfig) -> ConditionKind:
    """The kind of `cfg.conditioning`, or an error listing the known ones."""
    c = cfg.conditioning
    if c.kind == "bert" and not c.use_tokenizer:  # LD's layout checkpoints: BERT on layout token ids
        return layout.BERT_TOKENS
    if c.kind not in KINDS:
        raise ValueError(f"unknown conditioning kind {c.kind!r}; choose {', '.join(KINDS)}")
    return KINDS[c.kind]
