"""Bundled photos, SSIM, the photo feature net and the autoencoder evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage", reason="the photos ship inside scikit-image (pip install scikit-image)")

from ldmkit.data import photos as photos_module  # noqa: E402
from ldmkit.data.photos import (  # noqa: E402
    FREE_LICENSES,
    HELD_OUT,
    PHOTOS,
    PhotoCrops,
    photo_crops,
    photo_sources,
    split_sources,
)
from ldmkit.evaluation.autoencoder_eval import (  # noqa: E402
    evaluate_autoencoder,
    reconstruct,
    reconstruction_metrics,
)
from ldmkit.evaluation.classifier import DigitClassifier  # noqa: E402
from ldmkit.evaluation.photo_features import (  # noqa: E402
    PhotoFeatureConfig,
    load_or_train_photo_features,
    photo_feature_accuracy,
    train_photo_features,
)
from ldmkit.evaluation.ssim import gaussian_window_1d, ssim  # noqa: E402
from ldmkit.models.autoencoder_kl import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldmkit.models.distributions import DiagonalGaussianDistribution  # noqa: E402
from ldmkit.models.vq import VQModel  # noqa: E402
from ldmkit.training.loop import seeded_init  # noqa: E402

# a quick feature net: 32-pixel crops, 40 steps (~2 s on one thread); the default is 64 px, 300 steps
FEATURE_CFG = PhotoFeatureConfig(size=32, n_crops=512, steps=40, batch_size=32)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders, [B, C, H, W] -> same shape."""
    g = gaussian_window_1d(sigma).to(x.dtype)
    k, c = g.numel(), x.shape[1]
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="reflect"), g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="reflect"), g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(-1, 1)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("photo_features")


@pytest.fixture(scope="module")
def feature_net(feature_cache):
    return load_or_train_photo_features(feature_cache, FEATURE_CFG)


# ----------------------------------------------------------------------------- photos


def test_photos_load_offline_with_licenses() -> None:
    sources = photo_sources()
    assert [s.name for s in sources] == ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina"]
    for s in sources:
        assert s.license in FREE_LICENSES and s.info.statement and s.info.credit
        assert s.array.dtype == np.uint8 and s.array.ndim == 3 and s.array.shape[2] == 3
        assert min(s.array.shape[:2]) >= 256
        assert not s.array.flags.writeable  # cached arrays are shared
    # same pixels as skimage's own loaders (which read the same bundled files)
    import skimage.data

    for name in ("astronaut", "rocket"):
        ours = next(s.array for s in sources if s.name == name)
        np.testing.assert_array_equal(ours, getattr(skimage.data, name)())
    # every table entry names a licence category; non-free ones are opt-in only
    assert {p.license for p in PHOTOS} >= set(FREE_LICENSES)
    with pytest.raises(ValueError, match="cc-by-2.0"):
        photo_sources(["china"])
    grey = photo_sources(include_gray=True)
    camera = next(s for s in grey if s.name == "camera")
    assert camera.array.shape[2] == 3 and (camera.array[..., 0] == camera.array[..., 2]).all()


def test_missing_scikit_image_names_the_install_command(monkeypatch) -> None:
    photos_module._load.cache_clear()
    monkeypatch.setattr(photos_module.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install scikit-image"):
            photo_sources()
    finally:
        photos_module._load.cache_clear()


def test_held_out_photos_are_disjoint_from_train() -> None:
    train = {s.name for s in split_sources("train")}
    held = {s.name for s in split_sources("held_out")}
    assert held == set(HELD_OUT) and not train & held
    assert train | held == {s.name for s in photo_sources()}
    crops = PhotoCrops("train", 32, 64, seed=0)
    assert set(crops.names) == train
    assert set(PhotoCrops("held_out", 32, 16, seed=0).names) == held
    with pytest.raises(ValueError, match="split"):
        PhotoCrops("test", 32, 4)


def test_crops_deterministic_and_seed_dependent() -> None:
    a = PhotoCrops("train", 32, 24, seed=3)
    b = PhotoCrops("train", 32, 24, generator=torch.Generator().manual_seed(3))
    c = PhotoCrops("train", 32, 24, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (24, 3, 32, 32) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1
    state = torch.random.get_rng_state()
    photo_crops("all", 16, 4, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_crop_boxes_describe_the_crops() -> None:
    crops = PhotoCrops("all", 32, 32, seed=5, scale=(0.5, 2.0))
    photos = {s.name: s.array for s in photo_sources()}
    assert crops.flipped.any() and not crops.flipped.all()
    for i in range(len(crops)):
        top, left, side = crops.boxes[i].tolist()
        arr = photos[crops.names[int(crops.photo_index[i])]]
        assert 0 <= top and top + side <= arr.shape[0] and 0 <= left and left + side <= arr.shape[1]
        patch = torch.from_numpy(arr[top : top + side, left : left + side].copy()).permute(2, 0, 1).float()
        patch = F.interpolate(patch[None], size=(32, 32), mode="bilinear", antialias=True)[0] / 127.5 - 1
        if crops.flipped[i]:
            patch = patch.flip(-1)
        torch.testing.assert_close(crops.images[i], patch.clamp(-1, 1))
    labels = crops.region_labels(2)
    assert labels.min() >= 0 and labels.max() < 4 * len(crops.names)
    assert torch.equal(labels // 4, crops.photo_index)


def test_channel_shuffle_reorders_the_same_crops() -> None:
    plain = PhotoCrops("train", 16, 120, seed=2)
    shuffled = PhotoCrops("train", 16, 120, seed=2, channel_shuffle=True)
    assert torch.equal(plain.boxes, shuffled.boxes)  # the order is drawn last: same photos, places, flips
    assert torch.equal(plain.channel_order, torch.arange(3).expand(120, 3))
    orders = {tuple(o) for o in shuffled.channel_order.tolist()}
    assert len(orders) == 6  # every permutation of RGB occurs
    for i in range(len(plain)):
        assert torch.equal(shuffled.images[i], plain.images[i][shuffled.channel_order[i]])
    # with shuffled channels no channel is favoured: the per-channel means of the red-heavy set draw together
    spread = lambda x: float(x.mean((0, 2, 3)).max() - x.mean((0, 2, 3)).min())  # noqa: E731
    assert spread(shuffled.images) < spread(plain.images) / 3


def test_photo_data_config_adds_grey_photos_and_shuffle_to_training_only() -> None:
    from ldmkit.config import load_config
    from ldmkit.data.datasets import load_dataset

    cfg = load_config("photos_sr", {"data.limit": 300, "data.include_gray": True, "data.channel_shuffle": True})
    train, idx = load_dataset(cfg, "train")
    grey = train[:, 0].eq(train[:, 1]).flatten(1).all(1) & train[:, 1].eq(train[:, 2]).flatten(1).all(1)
    assert 0.3 < float(grey.float().mean()) < 0.8  # 5 of the 9 training photos are grey
    assert int(idx.max()) == 8
    test, _ = load_dataset(cfg, "test")  # held-out crops exactly as before: colour photos, channels in order
    held = PhotoCrops("held_out", 64, 300, seed=1)
    assert torch.equal(test, held.images)
    with pytest.raises(ValueError, match="apply to the photos dataset"):
        load_dataset(load_config("mnist_tiny", {"data.channel_shuffle": True}))


# ----------------------------------------------------------------------------- SSIM


def test_ssim_matches_skimage_on_photo_crops() -> None:
    from skimage.metrics import structural_similarity

    x = photo_crops("all", 48, 6, seed=1).double()
    for y in (_noisy(x, 0.1), _blur(x, 1.2), _noisy(_blur(x, 0.8), 0.03, seed=1)):
        ours = ssim(x, y, data_range=2.0)
        ref = [
            structural_similarity(
                a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(),
                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0, channel_axis=2,
            )
            for a, b in zip(x, y, strict=True)
        ]
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4, rtol=0)
    # float32 input (computed in float64 internally) and a grey [0, 255] image agree too
    y = _noisy(x, 0.05)
    np.testing.assert_allclose(ssim(x.float(), y.float()).numpy(), ssim(x, y).numpy(), atol=1e-5)
    g1, g2 = (x[:2, :1] + 1) * 127.5, (y[:2, :1] + 1) * 127.5
    ref = [structural_similarity(a[0].numpy(), b[0].numpy(), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255.0) for a, b in zip(g1, g2, strict=True)]
    np.testing.assert_allclose(ssim(g1, g2, data_range=255.0).numpy(), ref, atol=1e-4, rtol=0)


def test_ssim_identity_and_monotone_in_noise() -> None:
    x = photo_crops("held_out", 32, 8, seed=2)
    assert torch.allclose(ssim(x, x), torch.ones(8, dtype=torch.float64), atol=1e-12)
    means = [float(ssim(x, _noisy(x, s)).mean()) for s in (0.01, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(means, means[1:], strict=False))
    assert gaussian_window_1d(1.5).numel() == 11
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x[:, :, :8, :8], x[:, :, :8, :8])


# ----------------------------------------------------------------------------- photo features


def test_photo_feature_net_deterministic_cached_and_separates_photos(feature_net, feature_cache) -> None:
    again = train_photo_features(FEATURE_CFG)
    for (k, v), w in zip(feature_net.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5, msg=k)
    # a second call with the same settings loads the cached file instead of training
    (file,) = feature_cache.glob("photo_features_*.safetensors")
    mtime = file.stat().st_mtime_ns
    loaded = load_or_train_photo_features(feature_cache, FEATURE_CFG)
    assert file.stat().st_mtime_ns == mtime and not loaded.training
    for v, w in zip(feature_net.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v, w)
    # other settings -> another file
    other = PhotoFeatureConfig(size=32, n_crops=32, steps=1, batch_size=8)
    load_or_train_photo_features(feature_cache, other)
    assert len(list(feature_cache.glob("photo_features_*.safetensors"))) == 2

    fresh = PhotoCrops("all", 32, 192, seed=99, held_out=())  # crops never trained on
    feats = feature_net.features(fresh.images)
    assert feats.shape == (192, 128) and torch.equal(feats, feature_net.features(fresh.images))
    photo_acc, _ = photo_feature_accuracy(feature_net, fresh)
    assert photo_acc > 0.5  # chance is 1/6


def test_reconstruction_metrics_perfect_and_degraded(feature_net) -> None:
    x = photo_crops("held_out", 32, 64, seed=7)
    perfect = reconstruction_metrics(x, x.clone(), feature_net.features)
    assert perfect["psnr_db"] == math.inf and perfect["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["rfd"] == pytest.approx(0.0, abs=1e-6) and perfect["mse"] == 0
    results = [reconstruction_metrics(x, _blur(x, s), feature_net.features) for s in (0.7, 1.5, 3.0)]
    for better, worse in zip(results, results[1:], strict=False):
        assert better["psnr_db"] > worse["psnr_db"]
        assert better["ssim"] > worse["ssim"]
        assert better["rfd"] < worse["rfd"]
    noisy = reconstruction_metrics(x, _noisy(x, 0.2), feature_net.features)
    assert noisy["rfd"] > 10 * results[0]["rfd"]


# ----------------------------------------------------------------------------- evaluate_autoencoder


def _tiny_config(channels: int, **options) -> AutoencoderConfig:
    return AutoencoderConfig(z_channels=channels, resolution=32, in_channels=channels, out_ch=channels, ch=32,
                             ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), embed_dim=channels, **options)


class _PassThroughKL(AutoencoderKL):
    """A KL 'autoencoder' whose posterior mean is the image itself (f = 1), decoded by ``degrade``."""

    def __init__(self, channels: int, degrade=None) -> None:
        super().__init__(AutoencoderConfig(z_channels=channels, resolution=32, in_channels=channels,
                                           out_ch=channels, ch=32, ch_mult=(1,), num_res_blocks=0,
                                           attn_resolutions=(), embed_dim=channels))
        self.degrade = degrade

    def encode(self, x):
        return DiagonalGaussianDistribution(torch.cat([x, torch.full_like(x, -4.0)], dim=1))

    def decode(self, z):
        return z if self.degrade is None else self.degrade(z)


def test_evaluate_autoencoder_ranks_reconstructions(feature_net) -> None:
    x = photo_crops("held_out", 32, 48, seed=11)
    perfect = evaluate_autoencoder(_PassThroughKL(3), x, feature_net.features, batch_size=20)
    assert perfect["kind"] == "kl" and perfect["latent_shape"] == (3, 32, 32) and perfect["n_images"] == 48
    assert perfect["psnr_db"] == math.inf and perfect["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["rfd"] == pytest.approx(0.0, abs=1e-6) and perfect["kl_per_image_nats"] > 0

    def down_up(z):
        return F.interpolate(F.avg_pool2d(z, 2), scale_factor=2, mode="bilinear")

    blurry = evaluate_autoencoder(_PassThroughKL(3, down_up), x, feature_net.features)
    untrained = seeded_init(0, lambda: AutoencoderKL(_tiny_config(3))).train()
    bad = evaluate_autoencoder(untrained, x, feature_net.features)
    assert untrained.training  # the previous mode is restored
    assert bad["latent_shape"] == (3, 16, 16) and bad["downsample_factor"] == 2
    assert perfect["psnr_db"] > blurry["psnr_db"] > bad["psnr_db"]
    assert perfect["ssim"] > blurry["ssim"] > bad["ssim"]
    assert perfect["rfd"] < blurry["rfd"] < bad["rfd"]
    # the reported numbers are those of the posterior-mode reconstruction, clamped
    direct = reconstruction_metrics(x, reconstruct(untrained.eval(), x).clamp(-1, 1), feature_net.features)
    for key in ("psnr_db", "ssim", "mse", "rfd"):
        assert bad[key] == pytest.approx(direct[key], rel=1e-6)


def test_evaluate_autoencoder_vq_and_mnist_shapes() -> None:
    vq = seeded_init(0, lambda: VQModel(_tiny_config(3, double_z=False, kind="vq", n_embed=16))).eval()
    x = photo_crops("held_out", 32, 8, seed=0)
    out = evaluate_autoencoder(vq, x)
    assert out["kind"] == "vq" and out["rfd"] is None and out["codebook_size"] == 16
    assert 0 < out["codebook_usage"] <= 1 and 1 <= out["codebook_perplexity"] <= 16
    assert out["bits_per_image"] == 16 * 16 * 4
    assert out["code_entropy_bits"] == pytest.approx(math.log2(out["codebook_perplexity"]))

    # MNIST: 1-channel 32x32 digits scored with the judge's penultimate features
    judge = seeded_init(0, DigitClassifier).eval()
    digits = -torch.ones(16, 1, 32, 32)
    digits[:, :, 8:24, 12:20] = torch.linspace(-1, 1, 16).view(16, 1, 1, 1)
    perfect = evaluate_autoencoder(_PassThroughKL(1), digits, judge.features)
    assert perfect["rfd"] == pytest.approx(0.0, abs=1e-6)
    ae = seeded_init(0, lambda: AutoencoderKL(_tiny_config(1)))
    bad = evaluate_autoencoder(ae, digits, judge.features)
    assert bad["rfd"] > 0 and bad["psnr_db"] < 30
    with pytest.raises(TypeError, match="AutoencoderKL or VQModel"):
        evaluate_autoencoder(judge, digits)
