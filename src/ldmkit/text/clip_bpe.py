"""OpenAI CLIP's byte-level BPE tokenizer, the one every Stable Diffusion text encoder was trained with.

SD 1.x tokenises through transformers' ``CLIPTokenizer`` and SD 2.x through ``open_clip.tokenize``; both
implement the same algorithm over the same vocabulary file, ``bpe_simple_vocab_16e6.txt.gz``:

1. clean the text (HTML entities, whitespace, lower case);
2. split it into words with one regular expression (letters, single digits, punctuation runs, English
   contractions, the two special tokens);
3. map each word's UTF-8 bytes to printable characters, mark the word end with ``</w>`` and apply the
   ranked merges greedily, lowest rank first;
4. look the resulting symbols up in the 49408-entry vocabulary.

The two pipelines pad differently: transformers pads with the end-of-text id 49407 (``padding="max_length"``),
OpenCLIP pads with 0. ``CLIPTokenizer.__call__`` takes ``pad="eos"`` or ``pad="zero"`` for that reason. No
tokenizer package is needed: the third-party ``regex`` module is used when importable, otherwise an
equivalent ``re`` pattern is built from ``unicodedata``.
"""

from __future__ import annotations

import gzip
import html
import importlib.metadata
import importlib.util
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

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

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407

# The file lists far more merges than CLIP uses. CLIP's vocabulary has 49408 entries: 256 byte symbols, the same
# 256 with the end-of-word marker, one entry per merge, and the two special tokens. Hence 49408 - 512 - 2 merges.
N_MERGES = 49408 - 2 * 256 - 2
END_OF_WORD = "</w>"

_INSTALL_HINT = (
    f"install the data-only wheel with `pip install --no-deps open-clip-torch`, "
    f"or pass the path to {VOCAB_FILE_NAME} to CLIPTokenizer.from_file"
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible map from the 256 byte values to printable characters that BPE symbols are made of.

    Bytes that are already visible Latin-1 characters map to themselves; the 68 others (controls, space,
    soft hyphen, ...) map to consecutive code points from 256 on, in byte order. The dict's insertion order
    (visible bytes first) is the order of the first 256 vocabulary entries, so it must not be sorted.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    n_shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n_shifted)
            n_shifted += 1
    return table


# OpenAI's word pattern, compiled case-insensitively with the third-party ``regex`` module. Alternatives are
# tried in order at each position: special tokens, contractions, a run of letters, ONE digit, a run of anything
# that is neither whitespace, letter nor digit. Whitespace matches nothing and is therefore dropped.
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# ``regex``'s \s is Unicode's White_Space property; Python's ``re`` \s (str.isspace) also takes U+001C..U+001F.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPECIAL_AND_CONTRACTIONS = ("<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _class_body(code_points: list[int]) -> str:
    """``re`` character-class body for a sorted list of code points, as ranges of \\U escapes."""
    parts: list[str] = []
    i = 0
    while i < len(code_points):
        j = i
        while j + 1 < len(code_points) and code_points[j + 1] == code_points[j] + 1:
            j += 1
        lo, hi = code_points[i], code_points[j]
        parts.append(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}")
        i = j + 1
    return "".join(parts)


def _re_word_pattern() -> re.Pattern[str]:
    """The word pattern for Python's ``re``, equal to the ``regex`` one on every code point both engines know.

    ``re`` has no \\p{L} (categories Lu Ll Lt Lm Lo) or \\p{N} (Nd Nl No) classes: ``\\w`` also takes ``_`` and
    marks, ``\\d`` only Nd. So the classes are read from ``unicodedata``. Case-insensitivity is emulated
    rather than flagged, because ``regex`` applies it unevenly: it does not widen \\p{L}, but it does remove
    from the negated class any character whose case partner is a letter or digit (only U+0345, combining
    ypogegrammeni, whose upper case is Greek Iota), so such characters match no alternative and are dropped;
    and the special tokens and contractions accept every character that case-folds to their letters
    ("'ſ" is a contraction).
    """
    letters: list[int] = []
    numbers: list[int] = []
    tied: list[int] = []
    # Characters equal to each ASCII letter under case folding (e.g. "s": "Ss\u017f", "k": "Kk\u212a").
    variants: dict[str, set[str]] = {c: {c} for c in "abcdefghijklmnopqrstuvwxyz"}
    category = unicodedata.category
    for cp in range(0x110000):
        ch = chr(cp)
        major = category(ch)[0]
        if major == "L":
            letters.append(cp)
        elif major == "N":
            numbers.append(cp)
        elif any(len(v) == 1 and v != ch and category(v)[0] in "LN" for v in (ch.lower(), ch.upper())):
            tied.append(cp)
        folded = ch.casefold()
        if folded in variants:
            variants[folded].add(ch)

    def caseless(literal: str) -> str:
        return "".join(f"[{''.join(sorted(variants[c]))}]" if c in variants else re.escape(c) for c in literal)

    literals = "|".join(caseless(word) for word in _SPECIAL_AND_CONTRACTIONS)
    L, N, T = _class_body(letters), _class_body(numbers), _class_body(tied)
    return re.compile(rf"{literals}|[{L}]+|[{N}]|[^{_WHITE_SPACE}{L}{N}{T}]+")


@lru_cache(maxsize=2)
def word_pattern(use_regex_module: bool | None = None) -> re.Pattern[str]:
    """Compiled word pattern: OpenAI's, with ``regex`` if available (``None``), else the ``re`` equivalent.

    Code points that ``regex``'s (newer) Unicode tables assign but ``unicodedata`` does not fall in the
    punctuation-run class of the ``re`` version.
    """
    if use_regex_module is None:
        use_regex_module = importlib.util.find_spec("regex") is not None
    if use_regex_module:
        import regex  # a transformers dependency, so usually present

        return regex.compile(_WORD_PATTERN, regex.IGNORECASE)
    return _re_word_pattern()


def clean_text(text: str) -> str:
    """OpenAI's text cleanup minus ftfy: NFC, HTML unescape (twice, as OpenAI does), whitespace collapse, lower.

    OpenAI and OpenCLIP first run ``ftfy.fix_text``, which repairs mojibake and also uncurls quotes, splits
    Latin ligatures and narrows full-width characters. ftfy is not a dependency here, so those repairs are
    skipped; only its final NFC normalisation is kept (transformers' CLIPTokenizer also applies NFC).
    Consequence: "don’t" with a curly apostrophe tokenises differently from ftfy-cleaned pipelines.
    """
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def default_vocab_path(package: str = "open_clip", distribution: str = "open-clip-torch") -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside an installed OpenCLIP package without importing it.

    Importing ``open_clip`` would pull in torchvision and more; ``find_spec`` on a top-level name only
    resolves where the package lives. The distribution's file list is the fallback for unusual layouts.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / VOCAB_FILE_NAME
        if candidate.is_file():
            return candidate
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or []:
            if file.name == VOCAB_FILE_NAME:
                candidate = Path(str(dist.locate_file(file)))
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {VOCAB_FILE_NAME} not found: neither package {package!r} nor distribution "
        f"{distribution!r} provides it; {_INSTALL_HINT}"
    )


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """The ``N_MERGES`` ranked merges CLIP uses, from the gzipped merges file (first line is a version header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary file {str(path)!r} does not exist; {_INSTALL_HINT}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{str(path)!r} is not a CLIP BPE merges file: expected {N_MERGES} lines of two symbols after the header"
        )
    return merges  # type: ignore[return-value]


class CLIPTokenizer:
    """Text -> CLIP token ids. Build with ``from_file(path)`` or ``default()``; call on a batch of strings."""

    def __init__(self, merges: Sequence[tuple[str, str]]) -> None:
        if len(merges) != N_MERGES:
            raise ValueError(f"CLIP uses exactly {N_MERGES} merges, got {len(merges)}")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.merges: list[tuple[str, str]] = [tuple(m) for m in merges]  # type: ignore[misc]
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(self.merges)}
        self.sot_id = self.encoder[START_OF_TEXT]
        self.eot_id = self.encoder[END_OF_TEXT]
        if (self.sot_id, self.eot_id) != (SOT_ID, EOT_ID) or len(self.encoder) != EOT_ID + 1:
            raise ValueError("merges do not produce CLIP's 49408-token vocabulary (duplicate merges?)")
        self.pattern = word_pattern()
        # Special tokens matched by the pattern must survive BPE unchanged, so they start in the cache.
        self._cache: dict[str, list[str]] = {START_OF_TEXT: [START_OF_TEXT], END_OF_TEXT: [END_OF_TEXT]}

    @classmethod
    def from_file(cls, path: str | Path) -> CLIPTokenizer:
        """Read ``bpe_simple_vocab_16e6.txt.gz`` (as shipped with OpenAI CLIP and OpenCLIP)."""
        return cls(read_merges(path))

    @classmethod
    def default(cls) -> CLIPTokenizer:
        """The vocabulary shipped inside the installed ``open-clip-torch`` wheel (never imported)."""
        return cls.from_file(default_vocab_path())

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """Greedy BPE of one pre-tokenised word (already byte-mapped): the symbols it ends up as."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            # The adjacent pair with the lowest merge rank is merged everywhere it occurs, left to right.
            best = min(zip(symbols, symbols[1:], strict=False), key=lambda pair: self.bpe_ranks.get(pair, N_MERGES))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self._cache) < 100_000:  # bounded so a long-running process cannot grow it without limit
            self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens, e.g. "a photo" -> [320, 1125]."""
        ids: list[int] = []
        for word in self.pattern.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of ``encode`` up to cleanup; end-of-word markers become spaces. Unknown ids raise KeyError."""
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)  # "</w>" is ASCII, so it survives as text
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int = 77,
        pad: str = "zero",
        truncate: bool = True,
    ) -> torch.Tensor:
        """Batch of texts -> LongTensor [B, context_length]: start id, tokens, end id, then padding.

        ``pad="eos"`` fills with the end-of-text id (SD 1.x: transformers, ``padding="max_length"``);
        ``pad="zero"`` fills with 0 (SD 2.x: ``open_clip.tokenize``, and OpenAI's ``clip.tokenize``). With
        ``truncate`` a too-long text keeps its first ``context_length - 1`` ids and still ends with the end id;
        without it, a too-long text raises ValueError.
        """
        if pad not in ("eos", "zero"):
            raise ValueError(f"pad must be 'eos' or 'zero', got {pad!r}")
        if context_length < 2:
            raise ValueError(f"context_length must hold at least the start and end tokens, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        fill = self.eot_id if pad == "eos" else 0
        out = torch.full((len(texts), context_length), fill, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {row} has {len(ids)} tokens, more than context_length={context_length}: {text[:60]!r}"
                    )
                ids = ids[: context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
