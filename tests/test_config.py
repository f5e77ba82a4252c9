"""Typed configs: presets load, bad keys and values are named, overrides apply."""

import pytest

from ldmkit.config import LDMConfig, from_dict, list_presets, load_config, to_dict


def test_presets_load_into_typed_dataclasses():
    assert {"mnist_demo", "mnist_tiny"} <= set(list_presets())
    cfg = load_config("mnist_demo")
    assert isinstance(cfg, LDMConfig)
    assert cfg.autoencoder.ch_mult == (1, 2, 2) and cfg.unet.context_dim == cfg.conditioning.embed_dim
    # dict round trip is lossless
    assert to_dict(from_dict(LDMConfig, to_dict(cfg))) == to_dict(cfg)


def test_overrides_and_errors(tmp_path):
    cfg = load_config("mnist_tiny", {"train_diffusion.steps": 7, "train_diffusion.lr": 1})
    assert cfg.train_diffusion.steps == 7 and cfg.train_diffusion.lr == 1.0
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in train_diffusion: stepz"):
        load_config("mnist_tiny", {"train_diffusion.stepz": 7})
    with pytest.raises(ValueError, match="train_diffusion.steps: expected int"):
        load_config("mnist_tiny", {"train_diffusion.steps": "many"})
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
