"""The identity first stage (pixel space, f = 1): an exact x -> x codec, configurable as autoencoder kind
"identity", and a pixel-space class-conditional LDM that trains and samples through the ordinary code paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldmkit.config import load_config, to_dict
from ldmkit.jobs.train import train_ldm
from ldmkit.latent import LatentCodec
from ldmkit.ldm.build import FIRST_STAGE_PREFIX, build_autoencoder
from ldmkit.ldm.checkpoint import load_checkpoint
from ldmkit.ldm.files import LDM_FILE
from ldmkit.models.autoencoder_kl import AutoencoderConfig
from ldmkit.models.distributions import DiagonalGaussianDistribution
from ldmkit.models.identity import IdentityFirstStage, identity_config
from ldmkit.pipeline import LatentDiffusionPipeline
from ldmkit.training.autoencoder import train_autoencoder
from ldmkit.training.diffusion import draw_latents, encode_moments


def _images(n: int = 4, c: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1  # [n, c, size, size] in [-1, 1]


def test_encode_decode_are_the_identity() -> None:
    ae = IdentityFirstStage(identity_config(channels=3))
    x = _images(c=3)
    post = ae.encode(x)
    assert post.parameters.shape == (4, 6, 8, 8)  # [mean | logvar]
    assert torch.equal(post.mode(), x)
    assert torch.equal(post.sample(torch.Generator().manual_seed(1)), x)  # a point mass: no noise at all
    assert torch.equal(post.kl(), torch.zeros(4))
    assert torch.equal(ae.decode(x), x)
    rec, _ = ae(x)
    assert torch.equal(rec, x)
    # rebuilt from its parameters alone (as encode_moments -> draw_latents does), it is still x to ~3e-7
    redrawn = DiagonalGaussianDistribution(post.parameters).sample(torch.Generator().manual_seed(2))
    assert (redrawn - x).abs().max().item() < 1e-5
    assert ae.downsample_factor == 1 and ae.latent_channels == 3
    assert not any(p.requires_grad for p in ae.parameters())  # nothing to train


def test_codec_and_training_encodings_pass_pixels_through() -> None:
    ae = IdentityFirstStage()  # one grey channel
    codec = LatentCodec(ae, scale_factor=1.0)
    x = _images(n=6, size=32)
    assert codec.latent_shape(32) == (1, 32, 32)
    z = codec.encode(x, torch.Generator().manual_seed(0))
    assert (z - x).abs().max().item() < 1e-5
    assert torch.allclose(codec.decode(z), z)
    moments = encode_moments(codec, x)  # what stage-2 training draws its latents from
    assert moments.shape == (6, 2, 32, 32)
    drawn = draw_latents(moments, codec.latent_channels, torch.Generator().manual_seed(0))
    assert (drawn - x).abs().max().item() < 1e-5


def test_bad_inputs_and_configs_are_refused() -> None:
    ae = IdentityFirstStage()
    with pytest.raises(ValueError, match="input channels"):
        ae.encode(_images(c=3))
    with pytest.raises(ValueError, match="latent"):
        ae.decode(_images(c=2))
    base = to_dict(identity_config(channels=1))
    with pytest.raises(ValueError, match="in_channels == out_ch == embed_dim"):
        AutoencoderConfig(**{**base, "embed_dim": 3})
    with pytest.raises(ValueError, match="ch_mult must have one level"):
        AutoencoderConfig(**{**base, "ch_mult": [1, 2]})
    with pytest.raises(ValueError, match="kind 'identity'"):
        IdentityFirstStage(AutoencoderConfig(**{**base, "kind": "kl", "double_z": True}))


def pixel_config(**over: object):  # noqa: ANN201
    """mnist_tiny in pixel space: the identity first stage and a UNet on 1 x 32 x 32 (three levels, 32 -> 8)."""
    overrides = {"autoencoder": to_dict(identity_config(1, 32)), "scale_factor": 1.0, "unet.image_size": 32,
                 "unet.in_channels": 1, "unet.out_channels": 1, "unet.model_channels": 32,
                 "unet.channel_mult": [1, 1, 2], "unet.attention_resolutions": [4], "unet.num_head_channels": 32,
                 "data.limit": 64, "train_diffusion.steps": 3, "train_diffusion.batch_size": 8,
                 "train_diffusion.checkpoint_every": 3, "train_diffusion.tensorboard": False,
                 "train_autoencoder.tensorboard": False, **over}
    return load_config("mnist_tiny", overrides)


def test_identity_is_built_from_config_and_needs_no_training(tmp_path: Path) -> None:
    cfg = pixel_config()
    assert isinstance(build_autoencoder(cfg), IdentityFirstStage)
    ae = train_autoencoder(cfg, _images(n=4, size=32), tmp_path)
    assert isinstance(ae, IdentityFirstStage)
    assert not any(tmp_path.iterdir())  # no stage-1 run, no files


def test_pixel_space_class_model_trains_and_samples(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = pixel_config()
    train_ldm(cfg, tmp_path, progress=False, log=lambda s: None)
    tensors, meta = load_checkpoint(tmp_path / LDM_FILE)
    assert meta["scale_factor"] == 1.0
    assert meta["config"]["autoencoder"]["kind"] == "identity"
    assert [k for k in tensors if k.startswith(FIRST_STAGE_PREFIX)] == [FIRST_STAGE_PREFIX + "device_anchor"]
    # three optimiser steps moved the UNet away from its seeded initialisation (the output conv starts at zero)
    out_w = tensors["model.diffusion_model.out.2.weight"]
    assert out_w.abs().max().item() > 0
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.codec.autoencoder, IdentityFirstStage)
    images = pipe.sample(class_label=[0, 7, 3], steps=2, guidance=2.0, seed=0)
    assert images.shape == (3, 1, 32, 32)
    assert torch.isfinite(images).all()
    # the sampler's final latent is the picture: no decoder in between
    z = pipe.sample(return_latents=True, class_label=[0, 7, 3], steps=2, guidance=2.0, seed=0)
    assert z.shape == (3, 1, 32, 32)
