"""Text tokenisation (pure Python and torch tensors; imports nothing else from ldmkit)."""

from ldmkit.text.clip_bpe import (
    END_OF_TEXT,
    EOT_ID,
    SOT_ID,
    START_OF_TEXT,
    VOCAB_FILE_NAME,
    CLIPTokenizer,
    clean_text,
    default_vocab_path,
)

__all__ = [
    "CLIPTokenizer",
    "END_OF_TEXT",
    "EOT_ID",
    "SOT_ID",
    "START_OF_TEXT",
    "VOCAB_FILE_NAME",
    "clean_text",
    "default_vocab_path",
]
