"""How well a first-stage autoencoder reconstructs held-out images (LDM sec. 3.1, Tab. 8).

The LDM paper scores its first stages by rFID (FID between real and reconstructed images), PSNR,
PSIM / SSIM and, for VQ models, codebook usage.  Here:

* ``psnr_db``: mean over images of the per-image PSNR (``image_metrics.psnr``, data range 2 for
  [-1, 1], equal to the usual [0, 1] PSNR);
* ``ssim``: mean over images of the per-image SSIM (``ssim.ssim``, Wang et al. 2004 with the 11x11
  Gaussian window; matches skimage);
* ``rfd``: the Frechet distance between Gaussians fitted to features of the real images and of their
  reconstructions (``frechet.py``).  No Inception network exists offline, so the features come from
  an in-domain network passed as ``feature_fn``: the MNIST judge's penultimate layer
  (``DigitClassifier.features``) for digits, ``PhotoFeatureNet.features``
  (``evaluation/photo_features.py``) for photos.  Like FID it is biased upwards for small N and
  depends on the feature network, so only compare values computed with the same feature network
  on the same images (same N);
* the latent shape, and for KL models the mean posterior KL per image (nats), for VQ models the
  codebook usage and perplexity over the whole evaluation set and the nominal bits per image
  ``h * w * log2(K)``.

KL reconstructions decode the posterior mode (its mean), as LDM's evaluation does; VQ reconstructions
decode the nearest codebook entries.  Reconstructions are clamped to [-1, 1] before scoring.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.autoencoder_kl import AutoencoderKL
from ..models.identity import IdentityFirstStage
from ..models.vq import VQModel
from .frechet import frechet_distance_from_features
from .image_metrics import mse, psnr
from .ssim import ssim

__all__ = ["evaluate_autoencoder", "reconstruct", "reconstruction_metrics"]

FeatureFn = Callable[[Tensor], Tensor]


@torch.no_grad()
def reconstruct(autoencoder: AutoencoderKL | VQModel, x: Tensor) -> Tensor:
    """Deterministic reconstruction of ``x [B, C, H, W]``: KL decodes the posterior mode, VQ the nearest codes.

    Call with the model in eval mode: a VQ model in training mode would update its codebook (EMA,
    dead-code restarts) while quantising.
    """
    if isinstance(autoencoder, VQModel):
        z_q, _, _ = autoencoder.quantize_latent(autoencoder.encode(x))
        return autoencoder.decode(z_q, force_not_quantize=True)
    if isinstance(autoencoder, AutoencoderKL):
        return autoencoder.decode(autoencoder.encode(x).mode())
    raise TypeError(f"expected an AutoencoderKL or VQModel, got {type(autoencoder).__name__}")


@torch.no_grad()
def reconstruction_metrics(
    images: Tensor,
    reconstructions: Tensor,
    feature_fn: FeatureFn | None = None,
    *,
    batch_size: int = 256,
    data_range: float = 2.0,
) -> dict[str, Any]:
    """PSNR, SSIM, MSE and (with ``feature_fn``) rFD of ``reconstructions`` against ``images`` ``[N, C, H, W]``.

    ``feature_fn`` maps an image batch to ``[B, D]`` features and must be deterministic (e.g. a
    network in eval mode); it is called in batches of ``batch_size`` on the images' device.
    Identical images give ``psnr_db = inf``, ``ssim = 1`` and ``rfd = 0``.
    """
    if images.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(reconstructions.shape)}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch [N, C, H, W], got {tuple(images.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = images.shape[0]
    psnrs, ssims, mses, f_real, f_rec = [], [], [], [], []
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size]
        r = reconstructions[start : start + batch_size]
        psnrs.append(psnr(r, x, data_range).cpu())
        ssims.append(ssim(r, x, data_range).cpu())
        mses.append(mse(r, x).cpu())
        if feature_fn is not None:
            f_real.append(feature_fn(x).detach().to("cpu", torch.float64))
            f_rec.append(feature_fn(r).detach().to("cpu", torch.float64))
    out: dict[str, Any] = {
        "n_images": n,
        "psnr_db": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "mse": float(torch.cat(mses).mean()),
        "rfd": None,
    }
    if feature_fn is not None:
        if n < 2:
            raise ValueError("rFD needs at least 2 images for a feature covariance")
        out["rfd"] = frechet_distance_from_features(torch.cat(f_real), torch.cat(f_rec))
    return out


@torch.no_grad()
def evaluate_autoencoder(
    autoencoder: AutoencoderKL | VQModel | IdentityFirstStage,
    images: Tensor,
    feature_fn: FeatureFn | None = None,
    batch_size: int = 64,
    *,
    data_range: float = 2.0,
    clamp: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Reconstruction quality of ``autoencoder`` on ``images [N, C, H, W]`` in [-1, 1].

    Returns a dict of plain Python values: ``kind`` ("kl"/"vq"), ``n_images``, ``latent_shape``
    ``(C, h, w)``, ``downsample_factor``, ``psnr_db``, ``ssim``, ``mse``, ``rfd`` (None without
    ``feature_fn``), ``latent_std`` (std of the posterior means / pre-quantisation latents over the
    whole set, whose inverse is LDM's scale factor estimate), and ``kl_per_image_nats`` (KL) or
    ``codebook_size``, ``codebook_usage``, ``codebook_perplexity``, ``code_entropy_bits`` and
    ``bits_per_image`` (VQ).

    The model runs in eval mode (its previous mode is restored afterwards) on ``device`` (default: the
    device of its parameters); ``feature_fn`` receives images and reconstructions on that device.
    The identity first stage of a pixel-space model (what training one returns) has nothing to measure: it
    is refused with a TypeError.

    Examples::

        judge = train_classifier(train_x, train_y)               # MNIST, [N, 1, 32, 32]
        evaluate_autoencoder(ae, test_x, judge.features)
        net = load_or_train_photo_features("runs/photo_features")  # photos, [N, 3, 64, 64]
        evaluate_autoencoder(ae, photo_crops("held_out", 64, 512, seed=1), net.features)
    """
    if not isinstance(autoencoder, (AutoencoderKL, VQModel)):
        raise TypeError(f"expected an AutoencoderKL or VQModel, got {type(autoencoder).__name__}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch [N, C, H, W], got {tuple(images.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = next(autoencoder.parameters()).device
    is_vq = isinstance(autoencoder, VQModel)
    was_training = autoencoder.training
    autoencoder.eval()
    try:
        recs, kls, codes = [], [], []
        z_sum = z_sq = 0.0
        z_count = 0
        latent_shape: tuple[int, ...] = ()
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device, torch.float32)
            if isinstance(autoencoder, VQModel):  # is_vq, spelled so that mypy narrows the type
                z = autoencoder.encode(x)  # pre-quantisation latent [B, D, h, w]
                z_q, _, info = autoencoder.quantize_latent(z)
                rec = autoencoder.decode(z_q, force_not_quantize=True)
                codes.append(info.indices.cpu())
            else:
                posterior = autoencoder.encode(x)
                z = posterior.mode()  # [B, C, h, w]
                rec = autoencoder.decode(z)
                kls.append(posterior.kl().to("cpu", torch.float64))
            latent_shape = tuple(z.shape[1:])
            z64 = z.to(torch.float64)
            z_sum += float(z64.sum())
            z_sq += float((z64 * z64).sum())
            z_count += z.numel()
            recs.append(rec.clamp(-1.0, 1.0) if clamp else rec)
        rec_all = torch.cat(recs)
    finally:
        autoencoder.train(was_training)

    metrics = reconstruction_metrics(
        images.to(device, torch.float32), rec_all, feature_fn, batch_size=batch_size, data_range=data_range
    )
    z_mean = z_sum / z_count
    out: dict[str, Any] = {
        "kind": "vq" if is_vq else "kl",
        "latent_shape": latent_shape,
        "downsample_factor": autoencoder.downsample_factor,
        **metrics,
        "latent_std": math.sqrt(max(0.0, z_sq / z_count - z_mean * z_mean)),
    }
    if isinstance(autoencoder, VQModel):  # is_vq
        k = autoencoder.quantize.n_e
        counts = torch.bincount(torch.cat(codes), minlength=k).to(torch.float64)  # [K]
        p = counts / counts.sum()
        entropy_bits = float(-(p[p > 0] * p[p > 0].log2()).sum())
        out.update(
            codebook_size=k,
            codebook_usage=float((counts > 0).to(torch.float64).mean()),
            codebook_perplexity=2.0**entropy_bits,
            code_entropy_bits=entropy_bits,
            bits_per_image=latent_shape[1] * latent_shape[2] * math.log2(k),
        )
    else:
        out["kl_per_image_nats"] = float(torch.cat(kls).mean())
    return out


def in_domain_features(data_name: str, cache_dir: str | Path, *, progress: bool = False) -> FeatureFn:
    """The feature map for a reconstruction Frechet distance on `data_name`, trained once and cached.

    mnist: the judge CNN's penultimate features (trained on the MNIST train set); photos: the photo feature
    net (`photo_features.py`). Other data have no in-domain network here (no Inception weights exist offline).
    """
    cache_dir = Path(cache_dir)
    if data_name == "mnist":
        from ..data.mnist import mnist_tensor
        from .classifier import load_or_train_judge

        images, labels = mnist_tensor("train")
        judge = load_or_train_judge(cache_dir / "judge.safetensors", images, labels, progress=progress)
        return judge.features
    if data_name == "photos":
        from .photo_features import load_or_train_photo_features

        return load_or_train_photo_features(cache_dir, progress=progress).features
    raise ValueError(f"no in-domain feature network for data {data_name!r} (only mnist and photos); "
                     "run with rfd off")
