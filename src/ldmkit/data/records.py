"""Your own data, read defensively: image folders, caption files (JSONL / CSV) and webdataset tar shards.

A large scraped dataset always holds some files that are not what they claim: truncated downloads, HTML
pages saved as .jpg, CMYK / 16-bit / palette / transparent images, 1-pixel trackers. Here every image is
converted to grey or RGB where it can be (16-bit scaled, not clipped; transparency composited over white)
and skipped where it cannot, with the reason counted in a `SkipReport`, so one bad file never stops a run.

Caption files: JSONL lines `{"file": "a.jpg", "caption": "..."}` ("path"/"image" and "text" are accepted
too) or a CSV with a header naming the same columns; paths are relative to the caption file's folder.

Shards: the webdataset layout, plain tar files whose members are grouped by key (the member path up to the
first dot of its name): `000017.jpg`, `000017.txt` (or `.caption`, or `.json` with a "caption"/"text" field),
optionally `000017.cls` (an integer class). A pattern may name several shards with braces,
`data/shard-{000..099}.tar`, or a glob. Read with the standard library's tarfile, streaming.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .folder import IMAGE_EXTENSIONS, _resize_center_crop

CAPTION_EXTENSIONS = ("txt", "caption", "json")


class BadImage(ValueError):
    """An image that cannot be used; `reason` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class SkipReport:
    """What was skipped while reading a dataset, by reason, with one example name each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, name: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, name)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no files skipped"
        parts = [f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in self.counts.most_common()]
        return f"skipped {self.total} file(s): " + ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {"skipped": self.total, "by_reason": dict(self.counts), "examples": dict(self.examples)}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images scaled into 0..255 (PIL's own convert would clip them to white)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) / 65535.0
    else:  # "I" (32-bit int) and "F": scale by the range the values actually use
        arr = arr.astype(np.float64)
        hi = arr.max() if arr.max() > 255 else 255.0
        scaled = np.clip(arr, 0, None) / max(hi, 1e-12)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L")


def decode_image(source: bytes | str | Path, resolution: int, channels: int = 3, *, min_size: int = 8,
                 name: str = "") -> Tensor:
    """Bytes or a file -> float32 [channels, resolution, resolution] in [-1, 1], or BadImage.

    Reasons: "unreadable" (not an image, or a format PIL cannot decode), "corrupt" (truncated or damaged
    data), "tiny" (short side below `min_size` pixels: icons and tracking pixels, not training images).
    """
    name = name or str(source if not isinstance(source, bytes) else "<bytes>")
    img: Image.Image  # opened as an ImageFile, then replaced by converted copies
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()  # decode now: Image.open is lazy and would defer truncation errors
            img = ImageOps.exif_transpose(img)  # camera photos store their rotation in EXIF
    except UnidentifiedImageError as e:
        raise BadImage("unreadable", f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage("corrupt", f"{name}: {e}") from None
    if min(img.size) < min_size:
        raise BadImage("tiny", f"{name}: {img.size[0]}x{img.size[1]} px is below data.min_size {min_size}")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)  # transparent pixels become white, not black
    img = _resize_center_crop(img.convert("RGB" if channels == 3 else "L"), resolution)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # [H, W] -> [H, W, 1]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # [C, H, W]


# ------------------------------------------------------------------------------------------ caption files


def read_caption_file(path: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a JSONL or CSV file; a line without both fields is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    rows: list[dict[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"caption file {path}: expected .jsonl or .csv")
    out = []
    for n, row in enumerate(rows, 1):
        file = next((row[k] for k in ("file", "path", "image", "file_name") if row.get(k)), None)
        caption = next((row[k] for k in ("caption", "text") if row.get(k) is not None), None)
        if file is None or caption is None:
            raise ValueError(f"{path}: row {n} needs a file (file/path/image) and a caption (caption/text) "
                             f"field, got {sorted(row)}")
        out.append((path.parent / file, str(caption)))
    if not out:
        raise ValueError(f"caption file {path} lists no images")
    return out


# ------------------------------------------------------------------------------------------------- shards


def expand_shards(pattern: str) -> list[str]:
    """`shard-{000..009}.tar` -> ten names (zero-padded as written); a glob; or a directory of .tar files."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        names = [pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():] for i in range(lo, hi + 1)]
        return [n for part in names for n in expand_shards(part)]
    if Path(pattern).is_dir():
        return sorted(str(p) for p in Path(pattern).glob("*.tar"))
    found = sorted(glob.glob(pattern))
    if not found and not any(c in pattern for c in "*?["):
        return [pattern]  # a single name: reading it reports it missing
    return found


def _key_and_ext(member: str) -> tuple[str, str]:
    """webdataset: the key is the path up to the first dot of the file name, the rest is the extension."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_shard_samples(shards: list[str], report: SkipReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, streaming through the shards in order; a missing or damaged
    shard is counted and the rest of its samples skipped."""
    for shard in shards:
        key, parts = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _key_and_ext(member.name)
                    if k != key and key is not None:
                        yield key, parts
                        parts = {}
                    key = k
                    f = tar.extractfile(member)
                    parts[ext] = f.read() if f is not None else b""
                # a whole archive ends with two zero blocks; one cut short at a member boundary reads as if it
                # ended there, so its size tells
                if Path(shard).is_file() and Path(shard).stat().st_size < tar.offset + 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"truncated after {tar.offset} bytes")
        except (tarfile.TarError, OSError, EOFError) as e:
            report.skip("damaged shard", f"{shard} ({e})")
        if key is not None and parts:
            yield key, parts


def caption_of(parts: dict[str, bytes]) -> str | None:
    for ext in CAPTION_EXTENSIONS:
        if ext in parts:
            text = parts[ext].decode("utf-8", errors="replace")
            if ext == "json":
                try:
                    meta = json.loads(text)
                except json.JSONDecodeError:
                    return None
                value = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
                return None if value is None else str(value)
            return text.strip()
    return None


def decode_sample(key: str, parts: dict[str, bytes], resolution: int, channels: int, min_size: int,
                  report: SkipReport) -> tuple[Tensor, int, str] | None:
    """One webdataset sample -> (image, class label (0 without .cls), caption ("" without one)), or None with
    the reason counted in `report`."""
    found = image_of(parts)
    if found is None:
        report.skip("no image", key)
        return None
    try:
        image = decode_image(found[1], resolution, channels, min_size=min_size, name=key)
    except BadImage as e:
        report.skip(e.reason, key)
        return None
    cls = (parts.get("cls") or b"").decode(errors="replace").strip()
    return image, int(cls) if cls.lstrip("-").isdigit() else 0, caption_of(parts) or ""


def image_of(parts: dict[str, bytes]) -> tuple[str, bytes] | None:
    for ext, data in parts.items():
        if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return ext, data
    return None


# ------------------------------------------------------------------------------- whole datasets in memory


@dataclass
class OwnData:
    """A dataset read into memory: images [N, C, R, R] in [-1, 1], class labels [N], captions when it has them,
    and what was skipped on the way."""

    images: Tensor
    labels: Tensor
    captions: list[str] | None
    report: SkipReport


def _finish(images: list[Tensor], labels: list[int], captions: list[str] | None, report: SkipReport,
            where: str) -> OwnData:
    if not images:
        raise ValueError(f"no usable images in {where} ({report.summary()})")
    return OwnData(torch.stack(images), torch.tensor(labels, dtype=torch.long), captions, report)


def read_folder(root: str | Path, resolution: int, channels: int, *, limit: int | None = None,
                min_size: int = 8) -> OwnData:
    """An image folder (class sub-folders optional, see data.folder) with bad files skipped and counted."""
    from .folder import ImageFolder

    ds = ImageFolder(root, resolution, channels=channels)
    images: list[Tensor]
    report, images, labels = SkipReport(), [], []
    for path, label in zip(ds.files, ds.labels, strict=True):
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append(decode_image(path, resolution, channels, min_size=min_size))
            labels.append(label)
        except BadImage as e:
            report.skip(e.reason, path.name)
    return _finish(images, labels, None, report, str(root))


def read_captioned(path: str | Path, resolution: int, channels: int, *, limit: int | None = None,
                   min_size: int = 8) -> OwnData:
    """The images of a caption file with their captions; missing and bad images skipped and counted."""
    images: list[Tensor]
    report, images, captions = SkipReport(), [], []
    for file, caption in read_caption_file(path):
        if limit is not None and len(images) >= limit:
            break
        if not file.is_file():
            report.skip("missing", str(file))
            continue
        try:
            images.append(decode_image(file, resolution, channels, min_size=min_size))
            captions.append(caption)
        except BadImage as e:
            report.skip(e.reason, file.name)
    return _finish(images, [0] * len(images), captions, report, str(path))


def read_shards(pattern: str, resolution: int, channels: int, *, limit: int | None = None,
                min_size: int = 8) -> OwnData:
    """Samples of webdataset tar shards (image + caption, optional class); captions are None when no sample
    has one. Samples without an image, and bad images, are skipped and counted."""
    shards = expand_shards(pattern)
    if not shards:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    images: list[Tensor]
    report, images, captions, labels = SkipReport(), [], [], []
    for key, parts in iter_shard_samples(shards, report):
        if limit is not None and len(images) >= limit:
            break
        sample = decode_sample(key, parts, resolution, channels, min_size, report)
        if sample is not None:
            images.append(sample[0])
            labels.append(sample[1])
            captions.append(sample[2])
    has_captions = any(captions)
    return _finish(images, labels, captions if has_captions else None, report, pattern)
