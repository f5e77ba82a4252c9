"""BERT WordPiece tokenizer read from a local ``vocab.txt``.

Latent Diffusion's text-to-image model (``txt2img-1p4B``) tokenises captions with HuggingFace's
``BertTokenizerFast.from_pretrained("bert-base-uncased")`` called with ``truncation=True, max_length=77,
padding="max_length"``. This module reproduces those ids from the same vocabulary file, without network
access and without the ``transformers`` / ``tokenizers`` packages:

1. special tokens (``[PAD] [UNK] [CLS] [SEP] [MASK]``) written literally in the text are kept whole, as the
   HF tokenizer matches them in the raw text before any normalisation;
2. basic tokenisation: drop NUL, U+FFFD and control characters, turn whitespace into spaces, put spaces
   around CJK ideographs, and (when lowercasing) strip accents (NFD, drop non-spacing marks) and lowercase;
   then split on whitespace and make every punctuation character its own word;
3. WordPiece: each word is cut greedily into the longest vocabulary pieces from the left, continuation
   pieces spelled with a ``##`` prefix; a word with no full cover, or longer than 100 characters, becomes
   ``[UNK]``.

Where the original Python ``BertTokenizer`` and the Rust ``BertTokenizerFast`` disagree, this follows the
fast one (the one LD used): lowercasing is per character, so a final capital sigma becomes ``σ``, not ``ς``.

Pure Python plus ``torch`` for the returned tensor; imports nothing else from ldmkit.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["WordPieceTokenizer"]

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
CONTINUATION_PREFIX = "##"
MAX_CHARS_PER_WORD = 100

# Code point blocks BERT treats as "Chinese characters": CJK Unified Ideographs and their extensions A-E,
# plus the compatibility ideographs. Hiragana, katakana and hangul are not in these blocks, so they stay
# inside words (this is BERT's definition, kept for id parity).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_control(ch: str) -> bool:
    # Tab, newline and carriage return are Unicode controls, but BERT treats them as whitespace.
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    # All non-alphanumeric printable ASCII counts (so "$", "^", "`" split words although Unicode files
    # them as symbols), plus every Unicode punctuation category.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _read_vocab(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"WordPiece vocabulary file not found: {path}")
    text = path.read_text(encoding="utf-8")
    # Split on "\n" only: str.splitlines would also break on U+0085, U+2028 and friends, which can be
    # tokens. One token per line; the line number is the id.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    tokens = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not tokens:
        raise ValueError(f"WordPiece vocabulary file is empty: {path}")
    return tokens


class WordPieceTokenizer:
    """BERT (uncased by default) WordPiece tokenizer: text -> fixed-length id tensors and back.

    ``tokens`` is the vocabulary in id order (line ``i`` of ``vocab.txt`` is id ``i``). It must contain
    ``[PAD]``, ``[UNK]``, ``[CLS]`` and ``[SEP]``; ``[MASK]`` is optional.
    """

    def __init__(self, tokens: Sequence[str], *, lowercase: bool = True, source: str = "<in-memory vocab>") -> None:
        if len(tokens) == 0:
            raise ValueError(f"WordPiece vocabulary is empty ({source})")
        self.source = source
        self.lowercase = lowercase
        self.id_to_token: list[str] = list(tokens)
        # A repeated token maps to its last line, as a dict built line by line does in the HF loader.
        self.token_to_id: dict[str, int] = {tok: i for i, tok in enumerate(self.id_to_token)}
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in self.token_to_id]
        if missing:
            raise ValueError(f"WordPiece vocabulary {source} lacks the special token(s) {', '.join(missing)}")
        self.pad_id = self.token_to_id[PAD]
        self.unk_id = self.token_to_id[UNK]
        self.cls_id = self.token_to_id[CLS]
        self.sep_id = self.token_to_id[SEP]
        self.special_tokens: tuple[str, ...] = tuple(t for t in (PAD, UNK, CLS, SEP, MASK) if t in self.token_to_id)
        self.special_ids: frozenset[int] = frozenset(self.token_to_id[t] for t in self.special_tokens)
        # Longest first so that no special token is cut by a shorter one that prefixes it.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    @classmethod
    def from_file(cls, vocab_path: str | Path, lowercase: bool = True) -> WordPieceTokenizer:
        """Read a BERT ``vocab.txt`` (one token per line, UTF-8)."""
        path = Path(vocab_path)
        return cls(_read_vocab(path), lowercase=lowercase, source=str(path))

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    # ------------------------------------------------------------------------------------------------------
    # text -> words

    def _normalize(self, text: str) -> str:
        chars: list[str] = []
        for ch in text:
            if ch == "\0" or ch == "\ufffd" or _is_control(ch):
                continue
            if ch.isspace():
                chars.append(" ")
            elif _is_cjk(ch):
                chars.extend((" ", ch, " "))
            else:
                chars.append(ch)
        out = "".join(chars)
        if self.lowercase:
            # Accents go first (NFD, drop non-spacing marks), then per-character lowercasing, which is the
            # order and granularity of the fast tokenizer LD used.
            out = "".join(c for c in unicodedata.normalize("NFD", out) if unicodedata.category(c) != "Mn")
            out = "".join(c.lower() for c in out)
        return out

    def _basic_words(self, text: str) -> list[str]:
        words: list[str] = []
        for chunk in self._normalize(text).split():
            current: list[str] = []
            for ch in chunk:
                if _is_punctuation(ch):
                    if current:
                        words.append("".join(current))
                        current = []
                    words.append(ch)
                else:
                    current.append(ch)
            if current:
                words.append("".join(current))
        return words

    def _wordpiece(self, word: str) -> list[str]:
        if len(word) > MAX_CHARS_PER_WORD:
            return [UNK]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            # Greedy longest match: shrink the candidate from the right until it is in the vocabulary.
            end = len(word)
            piece = None
            while start < end:
                candidate = word[start:end]
                if start > 0:
                    candidate = CONTINUATION_PREFIX + candidate
                if candidate in self.token_to_id:
                    piece = candidate
                    break
                end -= 1
            if piece is None:
                # One uncovered position makes the whole word unknown, not just that part.
                return [UNK]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of ``text``, without ``[CLS]`` / ``[SEP]`` and without truncation."""
        pieces: list[str] = []
        # re.split with a capturing group keeps the separators: odd indices are the special tokens.
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2 == 1:
                pieces.append(part)
                continue
            for word in self._basic_words(part):
                pieces.extend(self._wordpiece(word))
        return pieces

    def encode(self, text: str) -> list[int]:
        """Ids of ``tokenize(text)`` (no special tokens added, no truncation)."""
        return [self.token_to_id[piece] for piece in self.tokenize(text)]

    # ------------------------------------------------------------------------------------------------------
    # batches

    def __call__(self, texts: str | Sequence[str], max_length: int = 77) -> Tensor:
        """``[CLS] pieces [SEP] [PAD]...`` for each text -> LongTensor [B, max_length].

        Texts longer than ``max_length - 2`` pieces are cut at the end, and ``[SEP]`` stays the last real
        token, as HF's ``truncation=True, padding="max_length"`` does.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        out = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{row}] is {type(text).__name__}, expected str")
            ids = [self.cls_id, *self.encode(text)[: max_length - 2], self.sep_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Ids [L] -> text: ``##`` pieces glued to the previous piece, other pieces space-separated.

        Matches HF ``decode`` on this tokenizer: a space before ``. , ? !`` is removed. Lowercasing and
        stripped accents cannot be undone, and ``[UNK]`` is dropped with the other special tokens.
        """
        if isinstance(ids, Tensor):
            if ids.ndim != 1:
                raise ValueError(f"decode takes one sequence of ids [L], got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}) of {self.source}")
            if not (skip_special_tokens and i in self.special_ids):
                pieces.append(self.id_to_token[i])
        text = pieces[0] if pieces else ""  # HF leaves a leading "##" piece as it is
        for piece in pieces[1:]:
            if piece.startswith(CONTINUATION_PREFIX):
                text += piece[len(CONTINUATION_PREFIX) :]
            else:
                text += " " + piece
        for mark in ".,?!":
            text = text.replace(" " + mark, mark)
        return text
