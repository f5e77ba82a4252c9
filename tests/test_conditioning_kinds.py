"""Conditioning is one object per kind, found through one registry; a new kind is one file.

The worked example of the docs (docs/examples/ink_kind.py, included verbatim in docs/architecture.md) is trained
and sampled here: nothing else in ldmkit knows about it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ldmkit.conditioning import KINDS, kind_of
from ldmkit.config import load_config
from ldmkit.jobs.train import train_ldm
from ldmkit.pipeline import LatentDiffusionPipeline

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "ink_kind.py"
PRESETS = ["mnist_tiny", "mnist_sr", "mnist_inpaint", "mnist_layout", "mnist_semantic", "emoji_text_minilm",
           "emoji_text_bert", "sd-v1", "sd-v2", "sd-v1-inpainting", "ldm-bsr-sr", "ldm-inpainting-big",
           "ldm-semantic-synthesis256", "ldm-layout2img-openimages256", "ldm-lsun-churches-kl8", "ldm-cin256-v2"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_finds_its_kind(preset: str) -> None:
    cfg = load_config(preset)
    kind = kind_of(cfg)
    assert kind is KINDS.get(cfg.conditioning.kind) or cfg.conditioning.kind == "bert"
    assert kind.tasks(cfg)  # the web page has something to offer for it


def test_an_unknown_kind_is_one_clear_error() -> None:
    cfg = load_config("mnist_tiny", {"conditioning.kind": "colour"})
    with pytest.raises(ValueError, match="unknown conditioning kind 'colour'; choose none, class, clip"):
        kind_of(cfg)


@pytest.fixture(scope="module")
def ink_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("ink_kind", EXAMPLE)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers the kind "ink"
    run = tmp_path_factory.mktemp("ink")
    overrides = {"conditioning.kind": "ink", "train_autoencoder.steps": 40, "train_diffusion.steps": 300,
                 "data.limit": 1024}
    train_ldm("mnist_tiny", run, overrides=overrides, progress=False, log=lambda *a: None)
    yield run
    KINDS.pop("ink")


def test_a_kind_in_one_file_trains_and_steers_samples(ink_run: Path) -> None:
    pipe = LatentDiffusionPipeline.from_checkpoint(ink_run)
    assert pipe.conditioning == "ink" and type(pipe.parts.conditioner).__name__ == "InkEncoder"
    light, heavy = [0.08] * 8, [0.3] * 8  # MNIST digits hold 0.05 to 0.3 of ink
    a = pipe.sample(ink=light, steps=10, guidance=3.0, seed=0)
    assert torch.equal(a, pipe.sample(ink=light, steps=10, guidance=3.0, seed=0))
    more, gap = 0, 0.0
    for seed in (0, 1):  # the same noise, another condition
        ink_a, ink_b = ((x.mean((1, 2, 3)) + 1) / 2 for x in
                        (pipe.sample(ink=light, steps=10, guidance=3.0, seed=seed),
                         pipe.sample(ink=heavy, steps=10, guidance=3.0, seed=seed)))
        more += int((ink_b > ink_a).sum())
        gap += float(ink_b.mean() - ink_a.mean()) / 2
    # asked for more ink, drawn with more: 15 of 16 samples and 0.0027 more ink on average here (a model of this
    # size, trained for seconds, draws faint digits); a model that ignored the condition gives 0 and 0.0
    assert more >= 12 and gap > 0.001, (more, gap)
    with pytest.raises(ValueError, match="ink must be in"):
        pipe.sample(ink=[1.5], steps=2)
    with pytest.raises(ValueError, match="give ink="):
        pipe.sample(steps=2)
    with pytest.raises(ValueError, match="takes no class labels: it is conditioned on the amount of ink"):
        pipe.sample(class_label=[3], steps=2)


def test_other_models_refuse_the_new_kinds_input(tiny_run: Path) -> None:
    pipe = LatentDiffusionPipeline.from_checkpoint(tiny_run)
    with pytest.raises(ValueError, match="takes no ink: it is class-conditional"):
        pipe.sample(class_label=[3], ink=[0.2], steps=2)
