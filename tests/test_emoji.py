"""The Noto Color Emoji text-to-image dataset: selection, captions, pixels, splits and the render cache."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmkit.data import emoji as emoji_data
from ldmkit.data.emoji import DEFAULT_FONT, SKIN_TONES, emoji_dataset

pytest.importorskip("emoji", reason="captions need the 'emoji' package (pip install emoji)")
if not DEFAULT_FONT.is_file():
    pytest.skip(f"{DEFAULT_FONT} missing (apt-get install fonts-noto-color-emoji)", allow_module_level=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emoji_cache")


@pytest.fixture(scope="module")
def full(cache):
    return emoji_dataset(32, cache_dir=cache)


def test_count_captions_and_chars(full):
    n = len(full)
    assert 1700 <= n <= 2100, n
    assert len(full.chars) == len(full.captions) == full.images.shape[0] == n
    assert len(set(full.chars)) == n
    assert len(set(full.captions)) >= 0.99 * n  # distinct pictures should have distinct names
    for caption in full.captions:
        assert caption and caption == caption.strip() and caption == caption.lower()
        assert ":" not in caption, caption
        assert "_" not in caption
    by_char = dict(zip(full.chars, full.captions, strict=True))
    assert by_char["\U0001f600"] == "grinning face"
    assert by_char["\U0001f431"] == "cat face"
    assert by_char["\U0001f1eb\U0001f1f7"] == "france"  # flags need the ligature (Raqm) layout
    # default-yellow people and hands only; no skin-tone variants
    assert not any(SKIN_TONES.intersection(c) for c in full.chars)
    assert full.captions == sorted(full.captions)


def test_images_in_range_white_background_not_blank(full):
    x = full.images
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0
    corners = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # [N, 3, 4]
    assert (corners > 0.9).float().mean() > 0.95  # composited on white
    ink = (x < 0.8).any(dim=1).flatten(1).float().mean(1)  # [N] fraction of non-white pixels
    assert ink.min() > 0.02, full.captions[int(ink.argmin())]
    # colour emoji, not all black and white
    chroma = (x.max(dim=1).values - x.min(dim=1).values).flatten(1).amax(1)  # [N]
    assert (chroma > 0.3).float().mean() > 0.9


def test_splits_are_disjoint_and_cover_the_set(full, cache):
    train = emoji_dataset(32, split="train", cache_dir=cache)
    held = emoji_dataset(32, split="held_out", cache_dir=cache)
    assert not set(train.chars) & set(held.chars)
    assert set(train.chars) | set(held.chars) == set(full.chars)
    assert len(held) == len(full) // 10
    assert held.chars == full.chars[9::10]
    i = full.chars.index(held.chars[3])
    assert torch.equal(held.images[3], full.images[i]) and held.captions[3] == full.captions[i]


def test_cache_round_trip_and_determinism(full, cache, tmp_path, monkeypatch):
    files = list(cache.glob("emoji_32px_*.npz"))
    assert len(files) == 1
    # a second load must come from the file, not from rendering
    def no_render(*args, **kwargs):
        raise AssertionError("rendered although the cache exists")

    monkeypatch.setattr(emoji_data, "_render", no_render)
    again = emoji_dataset(32, cache_dir=cache)
    assert torch.equal(again.images, full.images) and again.captions == full.captions and again.chars == full.chars
    monkeypatch.undo()
    # a fresh render elsewhere gives the same bytes
    fresh = emoji_dataset(32, cache_dir=tmp_path / "other")
    assert torch.equal(fresh.images, full.images) and fresh.chars == full.chars


def test_corrupt_cache_is_rendered_again(tmp_path):
    first = emoji_dataset(16, cache_dir=tmp_path)
    (path,) = tmp_path.glob("emoji_16px_*.npz")
    path.write_bytes(b"not a zip file")
    second = emoji_dataset(16, cache_dir=tmp_path)
    assert torch.equal(first.images, second.images)
    with np.load(path) as data:  # replaced by a good file
        assert data["images"].shape == (len(first), 16, 16, 3)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path))
    assert emoji_data.default_cache_dir() == tmp_path
    monkeypatch.delenv("LDMKIT_CACHE")
    assert emoji_data.default_cache_dir() == Path.home() / ".cache" / "ldmkit"


@pytest.mark.parametrize("resolution", [0, 4, 137, 32.0, True])
def test_bad_resolution(resolution, tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        emoji_dataset(resolution, cache_dir=tmp_path)


def test_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        emoji_dataset(32, split="test", cache_dir=tmp_path)


def test_missing_font_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        emoji_dataset(32, font_path=tmp_path / "nope.ttf", cache_dir=tmp_path)


def test_missing_emoji_package_names_pip(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "emoji", None)  # makes `import emoji` fail
    with pytest.raises(ModuleNotFoundError, match="pip install emoji"):
        emoji_dataset(32, cache_dir=tmp_path)
