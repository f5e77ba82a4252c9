"""Low-resolution inputs for x``f`` super-resolution training: plain bicubic and a BSR-like chain.

The LDM super-resolution models (Rombach et al. 2022, sec. 4.4) were trained on low-res inputs made by
the "light" variant of the BSRGAN degradation model (Zhang et al. 2021, "Designing a Practical
Degradation Model for Deep Blind Image Super-Resolution"): ``degradation_bsrgan_variant`` in
``ldm/modules/image_degradation/bsrgan_light.py`` of CompVis/latent-diffusion.  A model trained only on
clean bicubic inputs learns to undo one exact kernel and fails on real, blurred, noisy, compressed
images; the random chain below is what makes it blind.

``bsr_degrade`` follows that variant.  Per image, with every draw taken from the caller's generator
(reference ranges are in pixels of the image at the time the step runs, values in [0, 1]):

1. with p = 0.25, if the factor is 4, a first halving (random-interpolation resize, or antialiased
   bicubic, each p = 1/2); the remaining factor is then ``sf = 2``;
2. a random order of five steps (the reference shuffles seven slots; the variant left two empty: a
   second blur and a camera-ISP model), with "down-sample" swapped before "resize to target" if drawn
   after it:

   - blur, p = 1/2 each: anisotropic Gaussian, covariance eigenvalues ``l1, l2 ~ U(0, (4 + sf) / 4)``,
     angle ``~ U(0, pi)``, kernel side 5-14; or isotropic Gaussian, ``sigma ~ U(0, (2 + 0.2 sf) / 4)``,
     kernel side 5-7; mirror padding;
   - down-sample: p = 0.8 a resize by ``1 / U(1, 2 sf)`` with random interpolation (linear, cubic, area);
     else an isotropic Gaussian blur ``sigma ~ U(0.1, 0.6 sf)`` whose centre is shifted by
     ``(sf - 1) / 2`` pixels, then keeping every ``sf``-th pixel (nearest down-sampling aligned with
     the pixel centres of a resize);
   - resize to exactly ``H / f x W / f`` with random interpolation (linear, cubic, area);
   - Gaussian noise, level ``randint(1, 2) / 255``: colour (p = 0.4), grey (p = 0.4), or
     channel-correlated (p = 0.2) with covariance ``(2 / 255)^2 U^T D U``, ``D`` diagonal with three
     ``U(0, 1)`` entries, ``U`` a random orthonormal basis;
   - JPEG with p = 0.9, quality ``randint(80, 95)``;
3. a final JPEG, quality ``randint(80, 95)``, always; clipping to [0, 1] after every resize and noise.

Departures from the reference, and why:

- Kernels have odd sides (the reference's even sides shift the image by half a pixel under
  ``ndimage.convolve``), and any kernel radius is clamped below the current image side, since
  32-64 px inputs pass through 4-16 px intermediates where a 13-tap mirror pad does not fit.
- Blur variances are floored at 1e-4 (the reference can draw an exactly singular covariance).
- The shifted-centre Gaussian is sampled analytically rather than by linearly re-interpolating a 25 x 25
  kernel (``shift_pixel``); its radius is ``min(12, side - 1)``.
- The channel-correlated noise uses ``U^T D U`` itself: the reference takes an element-wise ``abs`` of it,
  which can make the matrix indefinite.  For one channel, every noise branch is grey noise.
- Resizes use ``torch.nn.functional.interpolate`` (cv2's linear and cubic do not antialias when
  shrinking, nor does torch here; cv2 ``INTER_AREA`` is torch's ``area``), so values differ from cv2
  in detail; the ranges do not.
- Sizes: the reference works on 256 px crops (64 px low-res).  Its ranges are per pixel, so the chain
  is applied unchanged in pixel units, with two guards for small inputs: the free-ratio down-sampling
  never goes under 4 px a side (the reference's 1 / (2 sf) takes a 32 px input to 4 px, a 16 px one to
  2 px), and the first halving is skipped when the output would be under 4 px.  Kept in pixel units,
  the spread of PSNR against the clean bicubic input is about the same for 32, 64 and 256 px photo
  crops (5 / 50 / 95 % quantiles near 20 / 30 / 34-43 dB), so small images are not degraded more
  harshly.  The noise levels (1-2 / 255) and JPEG qualities (80-95) are per pixel too and kept as
  they are.
- The first halving is applied for any even factor >= 4 (the reference: only 4), leaving ``sf = f / 2``.

Inputs and outputs are float batches ``[B, C, H, W]`` in [-1, 1]; the output is quantised to 8 bits by
the final JPEG, as the reference returns ``uint8``.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["bicubic_downsample", "bsr_degrade"]

# values further than this outside [-1, 1] are taken as a wrong value range (e.g. [0, 255]), not overshoot
_RANGE_TOL = 0.1
# cv2 INTER_LINEAR, INTER_CUBIC, INTER_AREA: the three interpolations the reference picks from
_RESIZE_MODES = ("bilinear", "bicubic", "area")
_SCALE2_PROB = 0.25
_JPEG_PROB = 0.9
_JPEG_QUALITY = (80, 95)
_NOISE_LEVELS = (1, 2)  # / 255, the variant's noise_level1, noise_level2
_MIN_SIDE = 4  # smallest intermediate side of the free-ratio down-sampling
_OPS = ("blur", "downsample", "resize", "noise", "jpeg")


def _check_images(x: Tensor, factor: int) -> None:
    """Validate a batch ``[B, C, H, W]`` in [-1, 1] whose sides ``factor`` divides."""
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images in [-1, 1], got dtype {x.dtype}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the factor {factor}")
    if x.numel() == 0:
        return
    x = x.detach()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")


def bicubic_downsample(x: Tensor, factor: int = 4) -> Tensor:
    """Antialiased bicubic down-sampling ``[B, C, H, W] -> [B, C, H/f, W/f]``, clamped to [-1, 1].

    This is the clean low-res input of classic SR benchmarks (MATLAB ``imresize``: cubic kernel with
    ``a = -0.5``, widened by the factor so it also low-passes).  Cubic kernels overshoot at edges, hence
    the clamp.  ``factor = 1`` returns the (clamped) input.
    """
    _check_images(x, factor)
    if factor == 1:
        return x.clamp(-1.0, 1.0)
    h, w = x.shape[-2:]
    y = F.interpolate(x.float(), size=(h // factor, w // factor), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp_(-1.0, 1.0).to(x.dtype)


# --- random draws, all from the caller's generator ----------------------------------------------------


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64, device=g.device))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer uniform in ``[lo, hi]``, both ends included (as Python's ``random.randint``)."""
    return int(torch.randint(lo, hi + 1, (), generator=g, device=g.device))


def _normal(g: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=g, device=g.device).cpu()


# --- the steps, on one image [1, C, h, w] in [0, 1], float32 on the CPU --------------------------------


def _resize(img: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(img.shape[-2:]) == size:
        return img
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img, size=size, mode=mode, **kwargs).clamp_(0.0, 1.0)


def _random_resize(img: Tensor, size: tuple[int, int], g: torch.Generator) -> Tensor:
    return _resize(img, size, _RESIZE_MODES[_randint(g, 0, len(_RESIZE_MODES) - 1)])


def _filter(img: Tensor, kernel: Tensor) -> Tensor:
    """Correlate every channel with ``kernel [kh, kw]`` (odd sides) under mirror padding."""
    c = img.shape[1]
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = F.pad(img, (rx, rx, ry, ry), mode="reflect")  # scipy 'mirror' == torch 'reflect'
    weight = kernel.to(img.dtype).expand(c, 1, *kernel.shape)  # [C, 1, kh, kw]
    return F.conv2d(padded, weight, groups=c)


def _max_radius(img: Tensor, wanted: int) -> int:
    return max(0, min(wanted, min(img.shape[-2:]) - 1))  # reflect padding needs radius < side


def _gaussian_kernel(cov: Tensor, radius: int) -> Tensor:
    """Normalised 2-D Gaussian ``[2r+1, 2r+1]`` of covariance ``cov [2, 2]`` (x, y) centred on the middle tap."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    pos = torch.stack([xx, yy], dim=-1)  # [K, K, 2]
    inv = torch.linalg.inv(cov)
    k = torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", pos, inv, pos))  # [K, K]
    return k / k.sum()


def _random_blur(img: Tensor, sf: int, g: torch.Generator) -> Tensor:
    """``add_blur``: anisotropic or isotropic Gaussian with a random kernel, p = 1/2 each."""
    var_max = (4.0 + sf) / 4.0  # wd2: eigenvalue (variance) bound of the anisotropic kernel
    sigma_max = (2.0 + 0.2 * sf) / 4.0  # wd: sigma bound of the isotropic kernel
    if _uniform(g) < 0.5:
        l1 = max(var_max * _uniform(g), 1e-4)
        l2 = max(var_max * _uniform(g), 1e-4)
        radius = _randint(g, 2, 6)  # sides 5..13 (reference: 5..14)
        theta = _uniform(g, 0.0, math.pi)
        cos, sin = math.cos(theta), math.sin(theta)
        rot = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
        cov = rot @ torch.diag(torch.tensor([l1, l2], dtype=torch.float64)) @ rot.T
    else:
        radius = _randint(g, 2, 3)  # sides 5, 7 (reference: 5..7)
        var = max((sigma_max * _uniform(g)) ** 2, 1e-4)
        cov = torch.eye(2, dtype=torch.float64) * var
    radius = _max_radius(img, radius)
    if radius == 0:
        return img
    return _filter(img, _gaussian_kernel(cov, radius))


def _shifted_gaussian_subsample(img: Tensor, sf: int, g: torch.Generator) -> Tensor:
    """Blur with ``sigma ~ U(0.1, 0.6 sf)`` centred ``(sf - 1) / 2`` px down-right, then keep every sf-th pixel.

    Output pixel ``i`` then averages around input position ``sf i + (sf - 1) / 2``, the centre of its
    ``sf x sf`` block, so the result is aligned with an ordinary resize.
    """
    sigma = _uniform(g, 0.1, 0.6 * sf)
    radius = _max_radius(img, 12)
    if radius > 0:
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k1 = torch.exp(-0.5 * ((t - (sf - 1) / 2.0) / sigma) ** 2)  # [K], peak at +shift
        k1 = k1 / k1.sum()
        img = _filter(img, torch.outer(k1, k1))  # isotropic Gaussian, separable
    return img[..., ::sf, ::sf].clamp(0.0, 1.0)


def _random_downsample(img: Tensor, sf: int, target: tuple[int, int], g: torch.Generator) -> Tensor:
    """``downsample2``: a random-ratio resize (p = 0.8) or a shifted blur + nearest down-sampling."""
    if _uniform(g) < 0.8:
        sf1 = _uniform(g, 1.0, 2.0 * sf)
        h, w = img.shape[-2:]
        # never under _MIN_SIDE px (or the target side, if smaller): a 2 px image has no structure left
        size = (max(int(h / sf1), min(_MIN_SIDE, target[0])), max(int(w / sf1), min(_MIN_SIDE, target[1])))
        return _random_resize(img, size, g)
    return _shifted_gaussian_subsample(img, sf, g)


def _random_noise(img: Tensor, g: torch.Generator) -> Tensor:
    """``add_Gaussian_noise`` with the variant's levels: colour, grey or channel-correlated."""
    level = _randint(g, *_NOISE_LEVELS) / 255.0
    c, h, w = img.shape[1:]
    r = _uniform(g)
    if c == 1 or r < 0.4:
        noise = _normal(g, (1, 1, h, w)) * level  # grey: one field for all channels
    elif r > 0.6:
        noise = _normal(g, (1, c, h, w)) * level  # colour: independent per channel
    else:
        top = _NOISE_LEVELS[1] / 255.0
        d = torch.rand(c, generator=g, dtype=torch.float64, device=g.device).cpu()  # D = diag(d)
        q, _ = torch.linalg.qr(torch.rand(c, c, generator=g, dtype=torch.float64, device=g.device).cpu())  # [C, C]
        z = _normal(g, (h * w, c)).to(torch.float64)  # [HW, C] standard normal
        # rows of z diag(sqrt d) Q^T have covariance Q D Q^T, an orthonormal conjugate of D as in the reference
        n = (z * d.sqrt()) @ q.T * top  # [HW, C]
        noise = n.T.reshape(1, c, h, w).to(img.dtype)  # [HW, C] -> [1, C, H, W]
    return (img + noise).clamp_(0.0, 1.0)


def _jpeg(img: Tensor, g: torch.Generator) -> Tensor:
    """Encode and decode with PIL at quality ``randint(80, 95)`` (8-bit, as the reference's cv2 round trip)."""
    quality = _randint(g, *_JPEG_QUALITY)
    arr = (img[0].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)  # [C, h, w]
    # uint8 [h, w] opens as "L", [h, w, 3] as "RGB"
    pil = Image.fromarray(arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy())  # -> [h, w, C]
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert(pil.mode), dtype=np.float32) / 255.0
    out_t = torch.from_numpy(out.copy())
    out_t = out_t[None] if out_t.ndim == 2 else out_t.permute(2, 0, 1)  # -> [C, h, w]
    return out_t[None]


def _degrade_one(img: Tensor, factor: int, g: torch.Generator) -> Tensor:
    """The chain on one image ``[1, C, H, W]`` in [0, 1] -> ``[1, C, H/f, W/f]`` in [0, 1]."""
    h, w = img.shape[-2:]
    target = (h // factor, w // factor)
    sf = factor
    # downsample1: the reference only halves first for factor 4; never below a 4 px low-res image
    if factor >= 4 and factor % 2 == 0 and _uniform(g) < _SCALE2_PROB and min(target) >= 4:
        half = (h // 2, w // 2)
        if _uniform(g) < 0.5:
            img = _random_resize(img, half, g)
        else:
            img = F.interpolate(img, size=half, mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
        sf = factor // 2

    order = [_OPS[int(i)] for i in torch.randperm(len(_OPS), generator=g, device=g.device)]
    i_down, i_resize = order.index("downsample"), order.index("resize")
    if i_down > i_resize:  # the free-ratio down-sampling must come before the resize to the target size
        order[i_down], order[i_resize] = order[i_resize], order[i_down]

    for op in order:
        if op == "blur":
            img = _random_blur(img, sf, g)
        elif op == "downsample":
            img = _random_downsample(img, sf, target, g)
        elif op == "resize":
            img = _random_resize(img, target, g)
        elif op == "noise":
            img = _random_noise(img, g)
        elif _uniform(g) < _JPEG_PROB:  # op == "jpeg"
            img = _jpeg(img, g)
    img = _jpeg(img, g)  # the final compression is unconditional
    assert tuple(img.shape[-2:]) == target, (img.shape, target)  # "resize" always runs, JPEG keeps the size
    return img


def bsr_degrade(x: Tensor, factor: int = 4, *, generator: torch.Generator) -> Tensor:
    """BSR-like random degradation ``[B, C, H, W] -> [B, C, H/f, W/f]`` in [-1, 1], C = 1 or 3.

    Each image gets its own blur, down-sampling path, noise, JPEG qualities and step order (see the
    module docstring), drawn from ``generator`` image by image, so the same generator state gives the
    same output.  Runs on the CPU (JPEG goes through PIL); the result is returned on ``x``'s device and
    in its dtype.
    """
    _check_images(x, factor)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"bsr_degrade needs 1 or 3 channels (JPEG), got {x.shape[1]}")
    b, c, h, w = x.shape
    x01 = (x.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0  # the reference works in [0, 1]
    out = torch.empty(b, c, h // factor, w // factor)
    for i in range(b):
        out[i] = _degrade_one(x01[i : i + 1], factor, generator)[0]
    return (out * 2.0 - 1.0).clamp_(-1.0, 1.0).to(device=x.device, dtype=x.dtype)
