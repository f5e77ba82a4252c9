"""A real, offline text-to-image dataset: colour emoji rendered from Noto Color Emoji, captioned by their names.

Images come from Debian's ``fonts-noto-color-emoji`` (``NotoColorEmoji.ttf``), a CBDT font whose glyphs are
136x128 RGBA PNG bitmaps at one strike of 109 ppem; captions come from the ``emoji`` package's CLDR short
names (``emoji.EMOJI_DATA[char]["en"]``, e.g. ``":grinning_face:"`` -> ``"grinning face"``). Nothing is
downloaded.

Which emoji are kept:

* fully-qualified sequences only (``status == fully_qualified``): the minimally- and unqualified spellings
  draw the same glyph as their fully-qualified twin, and components (skin tones, hair) are not emoji on
  their own;
* no skin-tone variants: a sequence containing a Fitzpatrick modifier (U+1F3FB..U+1F3FF) differs from its
  default-yellow base only in colour while its caption appends ``"light skin tone"`` etc. Keeping them
  would make ~2,000 near-duplicate images of people and hands, so only the default (yellow) version
  stays and every item is a distinct picture;
* only glyphs the font really has: the text must lay out as one glyph of the usual size with ink. An
  emoji newer than the font renders blank (``.notdef`` has no bitmap) and an unsupported ZWJ sequence falls
  apart into two or more glyphs side by side; both are dropped. ZWJ sequences and flags need the Raqm
  (HarfBuzz) layout engine, which Pillow wheels ship; without it those fall apart and are dropped too.

With ``emoji`` 2.16 and the Debian 2.042 font this gives 1,899 items (1,923 candidates; 23 Emoji 16-18
characters missing from the font and one ZWJ sequence it cannot join), all with distinct captions.

Order is by caption (then by character), which does not depend on the ``emoji`` package's dict order.
Split: every 10th item (index 9, 19, ...) is ``"held_out"``, the rest ``"train"``; sorted by caption, this
spreads the held-out items over all categories (faces, animals, flags, objects, ...).

Rendering: the glyph is drawn at its natural size on a white RGB canvas (Pillow composites the bitmap's
alpha over white), centred on a 136x136 square, and downscaled with Lanczos (Pillow widens the kernel by
the scale factor, so this is an anti-aliased area-like filter, not point sampling). The uint8 result is
cached as ``.npz`` so later loads skip the ~1,900 PNG decodes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from torch import Tensor

__all__ = ["DEFAULT_FONT", "EmojiSet", "default_cache_dir", "emoji_captions", "emoji_dataset"]

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only bitmap strike of the CBDT font; FreeType refuses other sizes
SPLITS = ("all", "train", "held_out")
HELD_OUT_EVERY = 10
MIN_RESOLUTION, MAX_RESOLUTION = 8, 136  # 136 is the glyph width: larger would only upsample
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_CACHE_VERSION = 1  # bump when selection or rendering changes, so old cache files are not reused


@dataclass
class EmojiSet:
    """Rendered emoji with their captions; row ``i`` of ``images`` shows ``chars[i]``, named ``captions[i]``."""

    images: Tensor  # [N, 3, R, R] float32 in [-1, 1], composited on a white background
    captions: list[str]
    chars: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def default_cache_dir() -> Path:
    """``$LDMKIT_CACHE`` if set, else ``~/.cache/ldmkit``."""
    env = os.environ.get("LDMKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ldmkit"


def _emoji_module() -> Any:
    try:
        import emoji
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the emoji dataset takes its captions from the 'emoji' package, which is not installed. "
            "Install it with:  pip install emoji"
        ) from None
    return emoji


def _font_file(font_path: str | Path | None) -> Path:
    path = DEFAULT_FONT if font_path is None else Path(font_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Noto Color Emoji font not found at {path}. On Debian/Ubuntu install it with:  "
            "apt-get install fonts-noto-color-emoji  (or pass font_path= to a NotoColorEmoji.ttf)"
        )
    return path


def _have_raqm() -> bool:
    return bool(features.check("raqm"))


def _load_font(path: Path) -> ImageFont.FreeTypeFont:
    # Raqm (HarfBuzz) is what joins ZWJ sequences, keycaps and flags into their ligature glyphs
    layout = ImageFont.Layout.RAQM if _have_raqm() else ImageFont.Layout.BASIC
    try:
        return ImageFont.truetype(str(path), FONT_SIZE, layout_engine=layout)
    except OSError as e:
        raise ValueError(f"{path} is not a usable Noto Color Emoji font (CBDT, size {FONT_SIZE}): {e}") from None


def emoji_captions() -> dict[str, str]:
    """Candidate emoji (fully qualified, no skin-tone modifier) -> caption, before the font check."""
    emoji = _emoji_module()
    fully_qualified = emoji.STATUS["fully_qualified"]
    out: dict[str, str] = {}
    for char, info in emoji.EMOJI_DATA.items():
        if info.get("status") != fully_qualified or SKIN_TONES.intersection(char):
            continue
        out[char] = info["en"].strip(":").replace("_", " ").lower()
    return out


def _has_glyph(font: ImageFont.FreeTypeFont, char: str) -> bool:
    left, top, right, bottom = font.getbbox(char)
    width, height = right - left, bottom - top
    # blank: .notdef has no bitmap; wider than ~one glyph: the sequence fell apart into several glyphs
    return height > 0 and 0 < width <= 1.5 * height


def _select(font: ImageFont.FreeTypeFont) -> tuple[list[str], list[str]]:
    items = sorted((caption, char) for char, caption in emoji_captions().items() if _has_glyph(font, char))
    return [char for _, char in items], [caption for caption, _ in items]


def _render(font: ImageFont.FreeTypeFont, char: str, resolution: int) -> np.ndarray:
    left, top, right, bottom = font.getbbox(char)
    # Pillow types boxes as float (a stroke width may be fractional); without a stroke they are whole pixels
    side = int(max(right - left, bottom - top))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    # on an RGB canvas Pillow alpha-blends the glyph's straight RGBA over white (on an RGBA canvas it would
    # blend over transparent black and darken the anti-aliased rims)
    origin = ((side - (right - left)) // 2 - left, (side - (bottom - top)) // 2 - top)
    ImageDraw.Draw(canvas).text(origin, char, font=font, embedded_color=True)
    small = canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8)  # [R, R, 3]


def _cache_file(cache_dir: Path, resolution: int, font: Path) -> Path:
    emoji = _emoji_module()
    doc = f"{_CACHE_VERSION}|{font.stat().st_size}|{getattr(emoji, '__version__', '?')}|{_have_raqm()}"
    tag = hashlib.sha256(doc.encode()).hexdigest()[:8]
    return cache_dir / f"emoji_{resolution}px_font{font.stat().st_size}_{tag}.npz"


def _read_cache(path: Path, resolution: int) -> tuple[np.ndarray, list[str], list[str]] | None:
    """The cached (images [N, R, R, 3] uint8, chars, captions), or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            pixels, chars, captions = data["images"], data["chars"].tolist(), data["captions"].tolist()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # corrupt or truncated: render again
    n = len(chars)
    if pixels.dtype != np.uint8 or pixels.shape != (n, resolution, resolution, 3) or len(captions) != n or n == 0:
        return None
    return pixels, chars, captions


def _write_cache(path: Path, pixels: np.ndarray, chars: list[str], captions: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and renamed over it, so a concurrent reader never sees half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=pixels, chars=np.array(chars, dtype=str), captions=np.array(captions, dtype=str))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as shareable as the font
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def emoji_dataset(
    resolution: int = 32,
    *,
    split: str = "all",
    font_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> EmojiSet:
    """The emoji at ``resolution`` x ``resolution``: ``split`` is ``"all"``, ``"train"`` or ``"held_out"``.

    The first call for a resolution renders every glyph (a few seconds) and caches the uint8 pixels in
    ``cache_dir`` (default ``default_cache_dir()``) under a name keyed by the resolution, the font file's
    size and the ``emoji`` version; a cache file that cannot be read is rendered again and replaced.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ValueError(f"resolution must be an int, got {resolution!r}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] pixels, got {resolution}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    font_file = _font_file(font_path)
    _emoji_module()  # fail with the install hint before touching the cache
    path = _cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), resolution, font_file)
    cached = _read_cache(path, resolution)
    if cached is None:
        font = _load_font(font_file)
        chars, captions = _select(font)
        if not chars:
            raise ValueError(f"no emoji glyph could be rendered from {font_file}; is it Noto Color Emoji?")
        pixels = np.stack([_render(font, c, resolution) for c in chars])  # [N, R, R, 3]
        _write_cache(path, pixels, chars, captions)
    else:
        pixels, chars, captions = cached
    if split != "all":
        held = np.arange(len(chars)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        keep = np.flatnonzero(held if split == "held_out" else ~held)
        pixels = pixels[keep]
        chars = [chars[i] for i in keep]
        captions = [captions[i] for i in keep]
    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)  # [N, 3, R, R] uint8
    images = images.to(torch.float32) / 127.5 - 1.0
    return EmojiSet(images=images, captions=list(captions), chars=list(chars))
