"""Shared pytest fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent


# The reference fixtures: data from the reference implementations run with random seeded weights, copied into
# the repository (tests/fixtures/reference/README.md says from where and how to refresh them).
REFERENCE_ROOT = Path(__file__).resolve().parent / "fixtures" / "reference"
REFERENCE_FIXTURES = ("reference_dir", "sgm_reference_dir")


def reference_folder(name: str) -> Path:
    """``tests/fixtures/reference/<name>`` (``compvis`` or ``sgm``); fails the test when it is missing.

    A missing folder is a broken checkout, not an optional extra: the test fails instead of skipping.
    """
    path = REFERENCE_ROOT / name
    if not (path / "parity").is_dir() or not (path / "manifests").is_dir():
        pytest.fail(f"reference fixtures missing: {path} has no parity/ and manifests/ "
                    f"(they are part of the repository; see {REFERENCE_ROOT / 'README.md'})", pytrace=False)
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The CompVis reference fixtures (README.md, parity/, manifests/): ``tests/fixtures/reference/compvis``."""
    return reference_folder("compvis")


@pytest.fixture(scope="session")
def sgm_reference_dir() -> Path:
    """The SDXL and ControlNet reference fixtures (README.md, parity/, manifests/): ``tests/fixtures/reference/sgm``."""
    return reference_folder("sgm")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for a reference fixture is a reference test, marked or not."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in REFERENCE_FIXTURES):
            item.add_marker(pytest.mark.reference)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Every reference test must run: a skip of a ``reference``-marked test becomes a failure naming the reason.

    An expected failure (xfail) is left alone; only skips are turned round.
    """
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("reference") is not None:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"reference test skipped, which is a failure (every reference test must run): {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """A test (with the fixtures it sets up) that seeds torch's global generator keeps that seed to itself: the
    generator's state is put back after each test, so no test's random draws depend on which tests ran before."""
    with torch.random.fork_rng(devices=[]):
        return (yield)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished seconds-long MNIST run (preset mnist_tiny): both stages, all checkpoints."""
    from ldmkit.jobs.train import train_ldm

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
    from ldmkit.jobs.train import train_ldm

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
