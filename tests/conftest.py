"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Directory of the CompVis reference fixtures (README.md, parity/, manifests/).

    Looks in ``<repo>/../shared/reference/compvis`` first, then in ``$LDMKIT_REFERENCE_DIR``;
    tests that need it are skipped when neither exists.
    """
    candidates = [REPO_ROOT.parent / "shared" / "reference" / "compvis"]
    env = os.environ.get("LDMKIT_REFERENCE_DIR")
    if env:
        candidates.append(Path(env))
    for path in candidates:
        if (path / "parity").is_dir():
            return path
    pytest.skip(
        "CompVis reference fixtures not found: looked in "
        + ", ".join(str(p) for p in candidates)
        + " (set LDMKIT_REFERENCE_DIR to the folder holding parity/ and manifests/)"
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished seconds-long MNIST run (preset mnist_tiny): both stages, all checkpoints."""
    from ldmkit.train import train_ldm

    run = tmp_path_factory.mktemp("tiny")
    train_ldm("mnist_tiny", run, progress=False, log=lambda s: None)
    return run


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}


def shape_picture(colour: str, shape: str) -> Image.Image:
    """One 32 px training picture of the captioned-shapes data: a coloured shape on a light background."""
    im = Image.new("RGB", (32, 32), (245, 245, 245))
    d = ImageDraw.Draw(im)
    rgb = COLOURS[colour]
    if shape == "circle":
        d.ellipse((6, 6, 26, 26), fill=rgb)
    elif shape == "square":
        d.rectangle((7, 7, 25, 25), fill=rgb)
    elif shape == "triangle":
        d.polygon([(16, 5), (28, 27), (4, 27)], fill=rgb)
    else:
        d.rectangle((4, 13, 28, 19), fill=rgb)
    return im


def shapes_dataset(folder: Path) -> Path:
    """16 captioned pictures ("a red circle", ...) and their JSONL caption file."""
    rows = []
    for colour in COLOURS:
        for shape in ("circle", "square", "triangle", "bar"):
            name = f"{colour}_{shape}.png"
            shape_picture(colour, shape).save(folder / name)
            rows.append({"file": name, "caption": f"a {colour} {shape}"})
    path = folder / "captions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def text_run(tmp_path_factory) -> Path:
    """A tiny text-to-image run (LD's trainable BERT, one layer) on captioned shapes, trained for seconds."""
    from ldmkit.train import train_ldm

    data = tmp_path_factory.mktemp("shapes")
    captions = shapes_dataset(data)
    run = tmp_path_factory.mktemp("text_run")
    overrides = {"data.name": "captions", "data.root": str(captions), "data.resolution": 32,
                 "conditioning.n_layer": 1, "unet.model_channels": 32, "autoencoder.ch": 32,
                 "train_autoencoder.steps": 150, "train_autoencoder.warmup_steps": 10,
                 "train_autoencoder.batch_size": 16, "train_diffusion.steps": 40,
                 "train_diffusion.warmup_steps": 5, "train_diffusion.batch_size": 16, "sampling.steps": 8}
    train_ldm("emoji_text_bert", run, overrides=overrides, progress=False, log=lambda *a: None)
    return run


@pytest.fixture
def one_thread():
    """Tiny models at 1 OpenMP thread: the fixtures' errors are the same as at 2, and on a busy 2-core runner two
    threads made a tiny UNet forward ~250x slower (2.5 s instead of 10 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
