"""MNIST digit canvases (layout / semantic-map data) and the layout metrics that score samples against them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from ldmkit.data.canvases import (
    PALETTE,
    Canvases,
    default_digit_size,
    mnist_canvases,
    one_hot_segmap,
    segmap_to_rgb,
)
from ldmkit.data.mnist import load_mnist, to_model_range
from ldmkit.evaluation.classifier import DigitClassifier, train_classifier
from ldmkit.evaluation.layout_eval import box_digit_accuracy, crop_boxes, segmap_iou
from ldmkit.text.layout import LayoutTokenizer


@pytest.fixture(scope="module")
def canvases() -> Canvases:
    return mnist_canvases(400, split="test", seed=1)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    # two OpenMP threads on a busy 2-core machine spin at every barrier (see tests/test_evaluation.py)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def judge(one_thread: None) -> DigitClassifier:
    # a quick judge: 100 steps on 10k training digits (~15 s on one core) reach ~97 % MNIST test accuracy;
    # enough to tell a right digit in a box from a wrong one
    images, labels = load_mnist("train")
    g = torch.Generator().manual_seed(0)
    subset = torch.randperm(len(images), generator=g)[:10000]
    return train_classifier(to_model_range(images[subset]), labels[subset], steps=100, generator=g, progress=False)


def _box_pixels(box: tuple, size: int) -> tuple[int, int, int, int]:
    _, x0, y0, x1, y1 = box
    return round(x0 * size), round(y0 * size), round(x1 * size), round(y1 * size)


def _iou(a: tuple, b: tuple) -> float:
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    return inter / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter)


# ----------------------------------------------------------------------------- canvases


def test_canvas_shapes_ranges_and_boxes(canvases: Canvases) -> None:
    c = canvases
    assert c.images.shape == (400, 1, 64, 64) and c.images.dtype == torch.float32
    assert c.segmaps.shape == (400, 64, 64) and c.segmaps.dtype == torch.long
    assert len(c) == len(c.layouts) == 400
    assert c.images.min() == -1.0 and c.images.max() <= 1.0
    assert c.images[:, :, 0].eq(-1.0).float().mean() > 0.9  # mostly black, including the borders
    assert int(c.segmaps.min()) == 0 and int(c.segmaps.max()) <= 10
    lo, hi = default_digit_size(64)
    assert (lo, hi) == (20, 32)
    counts = Counter(len(layout) for layout in c.layouts)
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > 60  # uniform digit count, none dropped
    for layout in c.layouts:
        pixel_boxes = []
        for box in layout:
            cls, x0, y0, x1, y1 = box
            assert isinstance(cls, int) and 0 <= cls <= 9
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
            px0, py0, px1, py1 = _box_pixels(box, 64)
            assert px1 - px0 == py1 - py0 and lo <= px1 - px0 <= hi  # square, side within digit_size
            assert abs(px0 - x0 * 64) < 1e-9  # boxes lie on pixel edges
            pixel_boxes.append((px0, py0, px1, py1))
        for i in range(len(pixel_boxes)):
            for j in range(i):
                assert _iou(pixel_boxes[i], pixel_boxes[j]) <= 0.1 + 1e-9


def test_segmap_marks_ink_with_the_class_of_a_covering_box(canvases: Canvases) -> None:
    c = canvases
    # ink (above mid-grey) and labelled pixels coincide exactly
    assert torch.equal(c.segmaps > 0, c.images[:, 0] > 0.0)
    for i in range(50):
        allowed = torch.zeros(11, 64, 64, dtype=torch.bool)  # which labels each pixel may carry
        for box in c.layouts[i]:
            x0, y0, x1, y1 = _box_pixels(box, 64)
            allowed[box[0] + 1, y0:y1, x0:x1] = True
        seg = c.segmaps[i]
        labelled = seg > 0
        assert torch.all(allowed.gather(0, seg[None])[0][labelled])
        assert torch.all(c.images[i, 0][~allowed[1:].any(0)] == -1.0)  # nothing outside the boxes
        for box in c.layouts[i]:  # every digit left some ink of its own class
            x0, y0, x1, y1 = _box_pixels(box, 64)
            assert (seg[y0:y1, x0:x1] == box[0] + 1).sum() > 10


def test_canvases_are_deterministic_per_seed() -> None:
    a = mnist_canvases(50, split="test", seed=5)
    b = mnist_canvases(50, split="test", seed=5)
    other = mnist_canvases(50, split="test", seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.segmaps, b.segmaps) and a.layouts == b.layouts
    assert not torch.equal(a.images, other.images)
    sub = a[3]
    assert isinstance(sub, Canvases) and len(sub) == 1 and sub.layouts == a.layouts[3:4]
    assert a[-1].layouts == a.layouts[-1:] and len(a[10:20]) == 10


def test_small_canvases_and_custom_settings() -> None:
    small = mnist_canvases(300, size=32, max_digits=2, split="test", seed=2)
    assert small.images.shape == (300, 1, 32, 32) and default_digit_size(32) == (16, 20)
    assert Counter(len(layout) for layout in small.layouts).keys() == {1, 2}
    two = mnist_canvases(200, size=32, min_digits=2, max_digits=2, split="test", seed=3)
    assert all(len(layout) == 2 for layout in two.layouts)  # crowded, but retried until both fit
    fixed = mnist_canvases(20, size=48, min_digits=3, max_digits=3, digit_size=(14, 14), max_iou=0.0, seed=4)
    for layout in fixed.layouts:
        assert len(layout) == 3
        boxes = [_box_pixels(b, 48) for b in layout]
        assert all(b[2] - b[0] == 14 for b in boxes)
        assert all(_iou(boxes[i], boxes[j]) == 0.0 for i in range(3) for j in range(i))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, "n must be"),
        ({"size": 4}, "at least 8"),
        ({"min_digits": 0}, "min_digits"),
        ({"min_digits": 3, "max_digits": 2}, "min_digits <= max_digits"),
        ({"digit_size": (30, 20)}, "smallest <= largest"),
        ({"digit_size": (20,)}, "smallest, largest"),
        ({"digit_size": (20, 80)}, "larger than the 64x64 canvas"),
        ({"max_iou": 1.0}, "max_iou"),
        ({"split": "valid"}, "unknown MNIST split"),
        ({"size": 32, "min_digits": 4, "max_digits": 4, "digit_size": (30, 32)}, "placed only 1 of min_digits=4"),
    ],
)
def test_canvas_argument_errors(kwargs: dict, message: str) -> None:
    args = {"n": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        mnist_canvases(args.pop("n"), **args)


def test_one_hot_and_rgb_segmaps(canvases: Canvases) -> None:
    seg = canvases.segmaps[:8]
    one_hot = one_hot_segmap(seg)
    assert one_hot.shape == (8, 11, 64, 64) and one_hot.dtype == torch.float32
    assert torch.equal(one_hot.sum(1), torch.ones(8, 64, 64)) and torch.equal(one_hot.argmax(1), seg)
    rgb = segmap_to_rgb(seg)
    assert rgb.shape == (8, 3, 64, 64) and rgb.min() >= -1.0 and rgb.max() <= 1.0
    assert torch.all(rgb.permute(0, 2, 3, 1)[seg == 0] == -1.0)  # background black
    assert len(set(PALETTE)) == 11  # every class its own colour
    with pytest.raises(ValueError, match="0 .. 4"):
        one_hot_segmap(seg, n_classes=5)
    with pytest.raises(ValueError, match="integer"):
        one_hot_segmap(seg.float())
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        segmap_to_rgb(seg[0])


def test_layouts_feed_the_layout_tokenizer(canvases: Canvases) -> None:
    tok = LayoutTokenizer(10)
    ids = tok.encode(canvases.layouts)
    assert ids.shape == (400, 92)
    for got, want in zip(tok.decode(ids), canvases.layouts, strict=True):
        assert [b[0] for b in got] == [b[0] for b in want]
        for g, w in zip(got, want, strict=True):
            assert max(abs(u - v) for u, v in zip(g[1:], w[1:], strict=True)) <= 0.5 / 89 + 1e-9


# ----------------------------------------------------------------------------- layout metrics


def test_crop_boxes_restores_mnist_cells() -> None:
    # a 28 px box is the digit's own cell, pasted unscaled: the crop is that MNIST image exactly
    c = mnist_canvases(30, size=32, max_digits=1, digit_size=(28, 28), split="test", seed=0)
    digits, classes = crop_boxes(c.images, c.layouts)
    assert digits.shape == (30, 1, 32, 32) and classes.tolist() == [layout[0][0] for layout in c.layouts]
    images, labels = load_mnist("test")
    mnist = to_model_range(images).flatten(1).double()  # [10000, 1024]
    crops = digits.flatten(1).double()  # [30, 1024]
    # squared distances to every test digit without a [30, 10000, 1024] intermediate
    dist2 = (crops**2).sum(1, keepdim=True) + (mnist**2).sum(1)[None] - 2 * crops @ mnist.T  # [30, 10000]
    best = dist2.argmin(1)
    # each crop is a test digit (up to the peak rescaling, exact for most digits) of the class asked for
    assert torch.all(dist2.min(1).values < 1.0)  # other digits are hundreds apart
    assert torch.equal(labels[best], classes)


def test_box_accuracy_and_iou_on_real_canvases(canvases: Canvases, judge: DigitClassifier) -> None:
    c = canvases
    accuracy = box_digit_accuracy(c.images, c.layouts, judge)
    # layouts of other canvases: the boxes mostly hold background or parts of digits of other classes
    shuffled = box_digit_accuracy(c.images, c.layouts[1:] + c.layouts[:1], judge)
    iou = segmap_iou(c.images, c.segmaps)
    iou_shuffled = segmap_iou(c.images, c.segmaps.roll(1, 0))
    print(f"box accuracy {accuracy:.4f} (shuffled {shuffled:.4f}), segmap IoU {iou:.4f} (shuffled {iou_shuffled:.4f})")
    assert accuracy > 0.93
    assert shuffled < 0.25
    assert iou == 1.0
    assert iou_shuffled < 0.2
    # small canvases work the same way
    small = mnist_canvases(200, size=32, max_digits=2, split="test", seed=4)
    assert box_digit_accuracy(small.images, small.layouts, judge) > 0.9
    # three-channel samples are judged on their channel mean
    assert box_digit_accuracy(c.images[:50].expand(-1, 3, -1, -1), c.layouts[:50], judge) == pytest.approx(
        box_digit_accuracy(c.images[:50], c.layouts[:50], judge)
    )


def test_segmap_iou_partial_and_edge_cases() -> None:
    seg = torch.zeros(2, 8, 8, dtype=torch.long)
    seg[0, :4] = 3  # top half requested
    images = -torch.ones(2, 1, 8, 8)
    images[0, 0, 2:6] = 1.0  # ink in rows 2..5: intersection 2 rows, union 6 rows
    # second image: nothing requested and nothing drawn counts as a perfect match
    assert segmap_iou(images, seg) == pytest.approx((2 / 6 + 1.0) / 2)
    assert segmap_iou(images, seg, threshold=1.0) == pytest.approx((0.0 + 1.0) / 2)  # nothing above 1
    with pytest.raises(ValueError, match="match the images"):
        segmap_iou(images, seg[:, :4])
    with pytest.raises(ValueError, match="integer"):
        segmap_iou(images, seg.float())


def test_box_metric_errors(judge: DigitClassifier) -> None:
    images = -torch.ones(2, 1, 16, 16)
    with pytest.raises(ValueError, match="2 images"):
        crop_boxes(images, [[]])
    with pytest.raises(ValueError, match="at least one box"):
        box_digit_accuracy(images, [[], []], judge)
    with pytest.raises(ValueError, match="digits 0..9"):
        crop_boxes(images, [[(10, 0.0, 0.0, 0.5, 0.5)], []])
    with pytest.raises(ValueError, match="x0 < x1"):
        crop_boxes(images, [[], [(1, 0.5, 0.0, 0.5, 0.5)]])
    with pytest.raises(ValueError, match="image 1, box 0"):
        crop_boxes(images, [[], [(1, 0.0, 0.0, 0.5)]])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        crop_boxes(images[:, 0], [[], []])
    # a box thinner than a pixel still gives a one-pixel crop
    digits, classes = crop_boxes(images, [[(1, 0.5, 0.5, 0.51, 0.51)], []])
    assert digits.shape == (1, 1, 32, 32) and classes.tolist() == [1]
