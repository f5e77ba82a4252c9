"""Layout tokenizer: taming's bounding-box token layout, round trips, shuffling and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.text.layout import LayoutTokenizer


def _taming_point(x: float, y: float, no_tokens: int) -> int:
    # the coordinate formula of taming's builder, written out independently of the class under test
    sections = int(math.sqrt(no_tokens))
    return int(round(y * (sections - 1))) * sections + int(round(x * (sections - 1)))


def _random_layouts(g: torch.Generator, batch: int, n_classes: int, max_objects: int) -> list[list[tuple]]:
    """Random boxes at least 0.05 wide and high (several grid steps), so none collapses when quantised."""
    layouts = []
    for _ in range(batch):
        k = int(torch.randint(0, max_objects + 1, (1,), generator=g))
        layout = []
        for _ in range(k):
            u = torch.rand(4, generator=g).tolist()
            x0, y0 = 0.95 * u[0], 0.95 * u[1]
            x1, y1 = x0 + 0.05 + u[2] * (0.95 - x0), y0 + 0.05 + u[3] * (0.95 - y0)
            layout.append((int(torch.randint(0, n_classes, (1,), generator=g)), x0, y0, x1, y1))
        layouts.append(layout)
    return layouts


def test_defaults_match_ld_layout2img_conditioning() -> None:
    tok = LayoutTokenizer(10)
    # ldm-layout2img-openimages256: BERT embedder with vocab_size 8192 and max_seq_len 92 = 30 * 3 + 2
    assert (tok.seq_len, tok.vocab_size, tok.pad_token, tok.grid) == (92, 8192, 8191, 90)
    assert LayoutTokenizer(10, encode_crop=False).seq_len == 90
    assert LayoutTokenizer(10, max_objects=4).seq_len == 14


def test_encode_known_layout() -> None:
    tok = LayoutTokenizer(10)
    ids = tok.encode([[(3, 0.1, 0.2, 0.5, 0.6), (7, 0.0, 0.0, 1.0, 1.0)], []])
    assert ids.dtype == torch.long and ids.shape == (2, 92)
    # 0.1 * 89 = 8.9 -> 9, 0.2 * 89 = 17.8 -> 18: 18 * 90 + 9; 0.5 * 89 = 44.5 rounds half to even -> 44
    assert ids[0, :6].tolist() == [3, 18 * 90 + 9, 53 * 90 + 44, 7, 0, 89 * 90 + 89]
    assert torch.all(ids[0, 6:90] == 8191)
    assert ids[0, 90:].tolist() == [0, 8099]  # the whole image as crop window
    assert torch.all(ids[1, :90] == 8191) and ids[1, 90:].tolist() == [0, 8099]


def test_small_grid_matches_taming_docstring_example() -> None:
    # taming's example: 16 tokens -> a 4x4 grid; (2/3, 1/3) is token 6 and (1, 1) token 15.  16 itself is
    # a perfect square (its corner (1, 1) would be the padding token), so 17 tokens keep the same grid.
    tok = LayoutTokenizer(3, no_tokens=17, max_objects=2, encode_crop=False)
    assert tok.grid == 4 and tok.pad_token == 16 and tok.seq_len == 6
    assert tok.coordinate_token(2 / 3, 1 / 3) == 6
    assert tok.encode([[(2, 2 / 3, 1 / 3, 1.0, 1.0)]]).tolist() == [[2, 6, 15, 16, 16, 16]]
    assert tok.token_coordinates(6) == (2 / 3, 1 / 3)
    with pytest.raises(ValueError, match="perfect square"):
        LayoutTokenizer(3, no_tokens=16)


def test_coordinates_follow_taming_formula() -> None:
    g = torch.Generator().manual_seed(0)
    tok = LayoutTokenizer(20)
    layouts = _random_layouts(g, 64, 20, 30)
    ids = tok.encode(layouts)
    for row, layout in zip(ids.tolist(), layouts, strict=True):
        expected = []
        for c, x0, y0, x1, y1 in layout:
            expected += [c, _taming_point(x0, y0, 8192), _taming_point(x1, y1, 8192)]
        expected += [8191] * (90 - len(expected)) + [_taming_point(0, 0, 8192), _taming_point(1, 1, 8192)]
        assert row == expected


def test_decode_round_trip_and_idempotence() -> None:
    g = torch.Generator().manual_seed(1)
    tok = LayoutTokenizer(12, max_objects=8)
    layouts = _random_layouts(g, 50, 12, 8)
    ids = tok.encode(layouts)
    decoded = tok.decode(ids)
    half_step = 0.5 / (tok.grid - 1) + 1e-9
    for got, want in zip(decoded, layouts, strict=True):
        assert len(got) == len(want)
        for (c1, *b1), (c2, *b2) in zip(got, want, strict=True):
            assert c1 == c2
            assert max(abs(u - v) for u, v in zip(b1, b2, strict=True)) <= half_step
    # decoded boxes sit on the grid, so encoding them again gives the same ids
    assert torch.equal(tok.encode(decoded), ids)
    assert tok.decode(ids[0]) == decoded[:1]  # a single row is accepted too
    assert tok.decode_crops(ids[:2]) == [(0.0, 0.0, 1.0, 1.0)] * 2


def test_crop_tokens() -> None:
    tok = LayoutTokenizer(10)
    ids = tok.encode([[(1, 0.2, 0.2, 0.4, 0.4)]], crops=[(0.25, 0.0, 0.75, 0.5)])
    assert ids[0, 90:].tolist() == [_taming_point(0.25, 0.0, 8192), _taming_point(0.75, 0.5, 8192)]
    with pytest.raises(ValueError, match="2 crops for 1 layouts"):
        tok.encode([[]], crops=[(0, 0, 1, 1)] * 2)
    with pytest.raises(ValueError, match="encode_crop=False"):
        LayoutTokenizer(10, encode_crop=False).encode([[]], crops=[(0, 0, 1, 1)])


def test_generator_shuffles_objects_reproducibly() -> None:
    tok = LayoutTokenizer(10, max_objects=6, encode_crop=False)
    layout = [(d, 0.1 * d, 0.05, 0.1 * d + 0.08, 0.5) for d in range(6)]
    plain = tok.encode([layout])
    assert plain[0, 0::3].tolist() == list(range(6))  # order kept without a generator
    a = tok.encode([layout] * 4, generator=torch.Generator().manual_seed(3))
    b = tok.encode([layout] * 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    triples = {tuple(t) for t in plain[0].view(-1, 3).tolist()}
    orders = set()
    for row in a:
        assert {tuple(t) for t in row.view(-1, 3).tolist()} == triples  # the same objects, moved as triples
        orders.add(tuple(row[0::3].tolist()))
    assert len(orders) > 1  # rows of one batch get different orders


def test_null_tokens_are_all_padding() -> None:
    tok = LayoutTokenizer(10)
    null = tok.null_tokens(3)
    assert null.shape == (3, 92) and null.dtype == torch.long and torch.all(null == tok.pad_token)
    assert tok.decode(null) == [[], [], []]
    assert tok.decode_crops(null) == [None, None, None]
    assert not torch.equal(null[:1], tok.encode([[]]))  # differs from an encoded empty layout (crop tokens)
    assert tok.encode([]).shape == (0, 92) and tok.null_tokens(0).shape == (0, 92)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([(10, 0.1, 0.1, 0.2, 0.2)], "unknown class 10"),
        ([(-1, 0.1, 0.1, 0.2, 0.2)], "unknown class -1"),
        ([(1.0, 0.1, 0.1, 0.2, 0.2)], "integer id"),
        ([(1, -0.1, 0.1, 0.2, 0.2)], r"in \[0, 1\]"),
        ([(1, 0.1, 0.1, 1.2, 0.2)], r"in \[0, 1\]"),
        ([(1, float("nan"), 0.1, 0.2, 0.2)], r"in \[0, 1\]"),
        ([(1, 0.3, 0.1, 0.3, 0.2)], "x0 < x1"),
        ([(1, 0.1, 0.5, 0.3, 0.2)], "y0 < y1"),
        ([(1, 0.1, 0.1, 0.2)], "5 values"),
        ([(1, 0.1, 0.1, 0.2, 0.2, 0.0)], "5 values"),
        ([(1, "a", 0.1, 0.2, 0.2)], "numbers"),
        ([(1, 0.1, 0.1, 0.2, 0.2)] * 31, "too many objects"),
    ],
)
def test_encode_errors_name_the_problem(layout: list, message: str) -> None:
    tok = LayoutTokenizer(10)
    with pytest.raises(ValueError, match=message):
        tok.encode([[(0, 0.0, 0.0, 1.0, 1.0)], layout])
    with pytest.raises(ValueError, match="layout 1"):  # and say which layout
        tok.encode([[(0, 0.0, 0.0, 1.0, 1.0)], layout])


def test_decode_and_constructor_errors() -> None:
    tok = LayoutTokenizer(10)
    with pytest.raises(ValueError, match=r"\[B, 92\]"):
        tok.decode(torch.zeros(2, 91, dtype=torch.long))
    with pytest.raises(ValueError, match="0 .. 8191"):
        tok.decode(torch.full((1, 92), 8192))
    bad = tok.null_tokens(1)
    bad[0, 0] = 50  # not a class id
    with pytest.raises(ValueError, match="not a class id"):
        tok.decode(bad)
    bad[0, :3] = torch.tensor([5, 8150, 8160])  # coordinates beyond the 90x90 grid
    with pytest.raises(ValueError, match="not a coordinate token"):
        tok.decode(bad)
    with pytest.raises(ValueError, match="integer"):
        tok.decode(torch.zeros(1, 92))
    with pytest.raises(ValueError, match="n_classes"):
        LayoutTokenizer(0)
    with pytest.raises(ValueError, match="below the padding token"):
        LayoutTokenizer(8192)
    with pytest.raises(ValueError, match="max_objects"):
        LayoutTokenizer(10, max_objects=0)
    with pytest.raises(ValueError, match="sequence"):
        tok.encode(torch.zeros(2, 5))
