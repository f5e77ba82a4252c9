"""Layout tokenizer: boxes of object classes -> token ids for a BERT-style conditioning transformer.

Latent Diffusion's layout-to-image model (``layout2img-openimages256``) conditions on a sequence of 92 ids
from a vocabulary of 8192, produced by taming-transformers' bounding-box conditional builder
(``ObjectsBoundingBoxConditionalBuilder`` in ``taming/data/conditional_builder/objects_bbox.py`` and
``objects_center_points.py``, configured by ``configs/open_images_scene_images_transformer.yaml`` with
``no_tokens: 8192, max_objects_per_image: 30, encode_crop: true``; the RDM code base repeats the same
layout as ``CoordinatesBoundingBoxConditionalBuilder``). This module follows that layout:

* **Coordinate grid.** ``grid = floor(sqrt(no_tokens))`` positions per axis (90 for 8192). A point
  ``(x, y)`` in [0, 1]^2 becomes ``round(y * (grid - 1)) * grid + round(x * (grid - 1))``: one token
  for both coordinates, row-major, so coordinate tokens are ``0 .. grid**2 - 1`` (0 .. 8099). Rounding is
  half-to-even, as Python's ``round`` in the original.
* **Objects.** Each object is a triple ``(class, corner(x0, y0), corner(x1, y1))``: the class id written
  as is (no offset: class tokens and coordinate tokens share ids and are told apart by position), then
  the top-left and bottom-right corners of its box.
* **Padding.** ``pad = no_tokens - 1`` (8191). Unused object slots are ``(pad, pad, pad)`` after the
  real objects, up to ``max_objects`` (30) slots.
* **Crop.** With ``encode_crop`` (as in LD's model) two more tokens follow: the corners of the crop
  window the image was cut from, ``(0, 0)`` and ``(1, 1)`` = tokens ``0, grid**2 - 1`` for a whole image.

So the sequence is ``[c_1, p0_1, p1_1, ..., c_30, p0_30, p1_30, crop0, crop1]``: ``3 * 30 + 2 = 92`` ids.

Differences from taming's builder, all deliberate:

* taming shuffles the objects with the global ``random`` module on every build (the model is trained on
  random orders); here the given order is kept unless ``encode`` gets a ``torch.Generator``, which then
  shuffles each layout, so randomness is explicit;
* taming truncates more than ``max_objects`` objects with a warning and silently clamps boxes; here bad
  input raises ``ValueError``;
* taming's optional group-of / occluded flags multiply the class space (``class + n_classes * flags``);
  here a class id is just an id below ``n_classes``, so pass such combined ids with a larger ``n_classes``;
* a ``no_tokens`` that is a perfect square would make the bottom-right grid corner equal the padding
  token in taming; it is rejected here.

``null_tokens`` (every position padding, crop slot included) is the empty layout used as the
unconditional input for classifier-free guidance. Pure Python plus ``torch``; imports nothing from ldmkit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Box", "LayoutTokenizer", "FULL_CROP"]

# (class id, x0, y0, x1, y1), coordinates in [0, 1] image units, x to the right and y down
Box = tuple[int, float, float, float, float]
FULL_CROP: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


class LayoutTokenizer:
    """Encode per-image object boxes as fixed-length token ids (taming's bounding-box builder layout).

    ``n_classes`` object classes (ids ``0 .. n_classes - 1``), a vocabulary of ``no_tokens`` ids,
    ``max_objects`` object slots and, with ``encode_crop``, two crop tokens at the end. The defaults give
    LD's layout-to-image conditioning: ``seq_len == 92`` and ``vocab_size == 8192``.
    """

    def __init__(self, n_classes: int, *, no_tokens: int = 8192, max_objects: int = 30,
                 encode_crop: bool = True) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be at least 1, got {n_classes}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {max_objects}")
        grid = math.isqrt(no_tokens)
        if grid < 2:
            raise ValueError(f"no_tokens={no_tokens} leaves a coordinate grid of {grid} positions; need at least 5")
        if grid * grid >= no_tokens:
            # the last grid point (1, 1) would be token no_tokens - 1, the padding token
            raise ValueError(f"no_tokens={no_tokens} is a perfect square: the corner (1, 1) would collide with the "
                             f"padding token {no_tokens - 1}; use e.g. {no_tokens + 1}")
        if n_classes > no_tokens - 1:
            raise ValueError(f"n_classes={n_classes} does not fit below the padding token {no_tokens - 1}")
        self.n_classes = n_classes
        self.no_tokens = no_tokens
        self.max_objects = max_objects
        self.encode_crop = encode_crop
        self.grid = grid

    def __repr__(self) -> str:
        return (f"LayoutTokenizer(n_classes={self.n_classes}, no_tokens={self.no_tokens}, "
                f"max_objects={self.max_objects}, encode_crop={self.encode_crop})")

    # ------------------------------------------------------------------ sizes

    @property
    def seq_len(self) -> int:
        """Tokens per layout: three per object slot, plus two for the crop window."""
        return 3 * self.max_objects + (2 if self.encode_crop else 0)

    @property
    def vocab_size(self) -> int:
        return self.no_tokens

    @property
    def pad_token(self) -> int:
        return self.no_tokens - 1

    # ------------------------------------------------------------------ coordinates

    def coordinate_token(self, x: float, y: float) -> int:
        """One token for the grid point nearest to ``(x, y)`` in [0, 1]^2 (row-major over the grid)."""
        step = self.grid - 1
        return int(round(y * step)) * self.grid + int(round(x * step))

    def token_coordinates(self, token: int) -> tuple[float, float]:
        """The grid point ``(x, y)`` of a coordinate token."""
        if not 0 <= token < self.grid * self.grid:
            raise ValueError(f"token {token} is not a coordinate token (0 .. {self.grid * self.grid - 1})")
        y, x = divmod(token, self.grid)
        return x / (self.grid - 1), y / (self.grid - 1)

    def _check_box(self, where: str, box: Sequence[float], n_coords: int = 4) -> tuple[float, float, float, float]:
        if len(box) != n_coords:
            raise ValueError(f"{where}: expected {n_coords} coordinates (x0, y0, x1, y1), got {len(box)}")
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: box coordinates must be numbers, got {tuple(box)!r}") from None
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):  # also rejects NaN
            raise ValueError(f"{where}: box coordinates must lie in [0, 1], got {(x0, y0, x1, y1)}")
        if x0 >= x1 or y0 >= y1:
            raise ValueError(f"{where}: box needs x0 < x1 and y0 < y1, got {(x0, y0, x1, y1)}")
        return x0, y0, x1, y1

    def _check_object(self, where: str, obj: Sequence) -> tuple[int, tuple[float, float, float, float]]:
        if len(obj) != 5:
            raise ValueError(f"{where}: expected a tuple (class, x0, y0, x1, y1) of 5 values, got {len(obj)}")
        cls = obj[0]
        if isinstance(cls, Tensor):
            cls = cls.item()
        if isinstance(cls, bool) or not isinstance(cls, numbers.Integral):
            raise ValueError(f"{where}: class must be an integer id, got {cls!r}")
        cls = int(cls)
        if not 0 <= cls < self.n_classes:
            raise ValueError(f"{where}: unknown class {cls} (valid ids are 0 .. {self.n_classes - 1})")
        return cls, self._check_box(where, obj[1:])

    # ------------------------------------------------------------------ encode / decode

    def encode(self, layouts: Sequence[Sequence[Box]], *,
               crops: Sequence[tuple[float, float, float, float]] | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Token ids ``LongTensor [B, seq_len]`` for ``B`` layouts of ``(class, x0, y0, x1, y1)`` boxes.

        ``crops`` gives each image's crop window (x0, y0, x1, y1) for the two crop tokens (default the
        whole image); it is an error without ``encode_crop``. With ``generator`` the objects of every
        layout are put in a random order, as taming does at training time; without it the order is kept,
        so the same layout always gives the same ids. An empty layout is all padding (plus crop tokens).
        """
        if isinstance(layouts, Tensor) or not isinstance(layouts, Sequence):
            raise ValueError(f"layouts must be a sequence of per-image box lists, got {type(layouts).__name__}")
        if crops is not None:
            if not self.encode_crop:
                raise ValueError("crops were given but this tokenizer has encode_crop=False")
            if len(crops) != len(layouts):
                raise ValueError(f"got {len(crops)} crops for {len(layouts)} layouts")
        pad = self.pad_token
        rows: list[list[int]] = []
        for i, layout in enumerate(layouts):
            if len(layout) > self.max_objects:
                raise ValueError(f"layout {i}: too many objects ({len(layout)}; max_objects={self.max_objects})")
            objects = [self._check_object(f"layout {i}, object {j}", obj) for j, obj in enumerate(layout)]
            if generator is not None and len(objects) > 1:
                objects = [objects[k] for k in torch.randperm(len(objects), generator=generator).tolist()]
            row: list[int] = []
            for cls, (x0, y0, x1, y1) in objects:
                row += [cls, self.coordinate_token(x0, y0), self.coordinate_token(x1, y1)]
            row += [pad] * (3 * (self.max_objects - len(objects)))
            if self.encode_crop:
                cx0, cy0, cx1, cy1 = FULL_CROP if crops is None else self._check_box(f"crop {i}", crops[i])
                row += [self.coordinate_token(cx0, cy0), self.coordinate_token(cx1, cy1)]
            rows.append(row)
        if not rows:
            return torch.empty(0, self.seq_len, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)  # [B, seq_len]

    def decode(self, tokens: Tensor) -> list[list[Box]]:
        """The layouts back from ``tokens [B, seq_len]`` (or one ``[seq_len]`` row): boxes on the grid.

        Slots whose class token is padding are skipped, wherever they are; the crop tokens are not part
        of the result (see ``decode_crops``). Coordinates come back quantised to multiples of
        ``1 / (grid - 1)``, so a box narrower than about one grid step can come back with ``x0 == x1``.
        """
        tokens = self._check_tokens(tokens)
        pad = self.pad_token
        out: list[list[Box]] = []
        for b, row in enumerate(tokens.tolist()):
            layout: list[Box] = []
            for k in range(self.max_objects):
                cls, t0, t1 = row[3 * k : 3 * k + 3]
                if cls == pad:
                    continue
                if cls >= self.n_classes:
                    raise ValueError(f"row {b}, slot {k}: token {cls} is not a class id (0 .. {self.n_classes - 1})")
                try:
                    (x0, y0), (x1, y1) = self.token_coordinates(t0), self.token_coordinates(t1)
                except ValueError as exc:
                    raise ValueError(f"row {b}, slot {k}: {exc}") from None
                layout.append((cls, x0, y0, x1, y1))
            out.append(layout)
        return out

    def decode_crops(self, tokens: Tensor) -> list[tuple[float, float, float, float] | None]:
        """The crop window of each row (``None`` where the crop slot is padding, as in ``null_tokens``)."""
        if not self.encode_crop:
            raise ValueError("this tokenizer has encode_crop=False: there are no crop tokens")
        out: list[tuple[float, float, float, float] | None] = []
        for t0, t1 in self._check_tokens(tokens)[:, -2:].tolist():
            if t0 == self.pad_token or t1 == self.pad_token:
                out.append(None)
                continue
            (x0, y0), (x1, y1) = self.token_coordinates(t0), self.token_coordinates(t1)
            out.append((x0, y0, x1, y1))
        return out

    def null_tokens(self, batch: int) -> Tensor:
        """The empty layout, every position padding: ``LongTensor [batch, seq_len]``.

        The unconditional input for classifier-free guidance. The crop slot is padding too, so the null
        condition differs from every real layout, including an encoded empty one.
        """
        if batch < 0:
            raise ValueError(f"batch must be non-negative, got {batch}")
        return torch.full((batch, self.seq_len), self.pad_token, dtype=torch.long)

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor):
            tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must be [B, {self.seq_len}], got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.no_tokens):
            raise ValueError(f"token ids must lie in 0 .. {self.no_tokens - 1}, got "
                             f"{int(tokens.min())} .. {int(tokens.max())}")
        return tokens.cpu()
