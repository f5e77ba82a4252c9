"""The MNIST "judge": a small CNN that scores generated digits.

It is used for two metrics of class-conditional MNIST models:

* conditional accuracy: the fraction of samples generated for class ``c`` that the judge labels ``c``;
* a Frechet distance on its penultimate features (``DigitClassifier.features``), an MNIST analogue
  of FID that needs no Inception weights.

Generated samples differ from test digits in ways a judge trained only on clean MNIST is
needlessly sensitive to: residual noise, a background that is not exactly -1, lower contrast and
imperfect centring.  Training therefore augments with random-strength Gaussian noise, random
brightness/contrast changes and +-2 px translations, so the judge's verdict reflects the digit's
shape rather than these artefacts.  The architecture is sized to reach >= 99 % clean test accuracy
in about a minute on two CPU cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "DigitClassifier",
    "augment_digits",
    "evaluate_classifier",
    "predict",
    "train_classifier",
]


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # BatchNorm is what lets this net converge in a few hundred AdamW steps; the conv bias is redundant with it
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DigitClassifier(nn.Module):
    """CNN for ``[B, 1, 32, 32]`` digits in [-1, 1] -> 10 logits; ``features`` gives ``[B, feature_dim]``.

    Layout (32 -> 16 -> 8 -> 4 spatial): one conv at full resolution (cheap, 1 input channel),
    two at 16x16 and two at 8x8, then a 128-d fully connected feature layer.  Most compute is at
    16x16 and 8x8, which keeps a training step around 80 ms for 128 images on two cores.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 128) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.widths = widths
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            *_conv_bn_relu(1, w1),
            nn.MaxPool2d(2),  # 32 -> 16
            *_conv_bn_relu(w1, w2),
            *_conv_bn_relu(w2, w2),
            nn.MaxPool2d(2),  # 16 -> 8
            *_conv_bn_relu(w2, w3),
            *_conv_bn_relu(w3, w3),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.fc = nn.Linear(w3 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, feature_dim]`` (post-ReLU), the embedding for Frechet distances."""
        if x.shape[-3:] != (1, 32, 32):
            raise ValueError(f"DigitClassifier expects [B, 1, 32, 32] images, got {tuple(x.shape)}")
        h = self.body(x)  # [B, w3, 4, 4]
        h = h.flatten(1)  # [B, w3 * 16]
        return F.relu(self.fc(h))  # [B, feature_dim]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # [B, 10]


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.rand(n, 1, 1, 1, generator=generator) * (high - low) + low  # [n, 1, 1, 1]


def augment_digits(
    x: Tensor,
    generator: torch.Generator,
    *,
    max_shift: int = 2,
    max_noise: float = 0.3,
    contrast: tuple[float, float] = (0.7, 1.2),
    max_brightness: float = 0.3,
) -> Tensor:
    """Random translation, contrast, brightness and Gaussian noise for ``[B, 1, H, W]`` digits in [-1, 1].

    Every draw uses ``generator``.  Strengths are drawn per image from zero upwards, so part of
    every batch stays close to clean MNIST and clean accuracy does not suffer.
    """
    b, _, h, w = x.shape
    if max_shift > 0:
        # translate by padding with background (-1) and cropping a random window per image;
        # unlike torch.roll this does not wrap strokes around to the opposite edge
        padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # [B, 1, H + 2s, W + 2s]
        dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
        x = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)  # [B, 1, H, W]
    # contrast scales about 0 and brightness adds a constant: the background moves off -1 and
    # strokes dim, as in under-trained or low-temperature samples
    scale = _uniform(b, contrast[0], contrast[1], generator)
    shift = _uniform(b, -max_brightness, max_brightness, generator)
    x = x * scale + shift
    if max_noise > 0:
        std = _uniform(b, 0.0, max_noise, generator)
        x = x + std * torch.randn(x.shape, generator=generator)
    return x


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: reaches high accuracy in few steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    steps: int = 800,
    batch_size: int = 128,
    lr: float = 3e-3,
    generator: torch.Generator | None = None,
    weight_decay: float = 5e-4,
    augment: bool = True,
    progress: bool = True,
) -> DigitClassifier:
    """Train a ``DigitClassifier`` on ``images [N, 1, 32, 32]`` in [-1, 1] and ``labels [N]``.

    AdamW with warm-up + cosine learning-rate decay; batches are drawn as shuffled epochs.  All
    randomness (initial weights, batch order, augmentation) comes from ``generator`` (a fresh
    ``torch.Generator`` seeded with 0 when ``None``), so a run is reproducible and leaves the global
    RNG untouched.  Returns the model in eval mode.

    The defaults (800 steps of 128 images, ~1.7 epochs of the 60k training set) gave 99.25-99.35 %
    clean and 99.20-99.33 % noisy (std 0.2) MNIST test accuracy over four seeds.  Cost: ~120 ms of
    CPU per step single-threaded (~100 s for 800 steps); two threads on an otherwise idle
    2-core machine ran a step in ~55-77 ms in short benchmarks (~45-62 s).  On a busy machine prefer
    ``torch.set_num_threads(1)``: two OpenMP threads competing with other processes spin at every
    barrier and were measured ~6x slower than one thread.
    """
    if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
        raise ValueError(f"images must be [N, 1, 32, 32], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    images = images.to(torch.float32)
    labels = labels.to(torch.int64)

    # initialise the weights from a seed drawn from `generator` inside a forked global RNG, because
    # nn.Module constructors only use the global generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()

    # no weight decay on BatchNorm and bias parameters: decaying them only hurts
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    warmup = max(1, min(100, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))

    n = images.shape[0]
    order = torch.randperm(n, generator=generator)
    cursor = 0
    model.train()
    bar = tqdm(range(steps), desc="judge", disable=not progress, leave=False)
    for _ in bar:
        if cursor + batch_size > n:  # new epoch: reshuffle rather than sample with replacement
            order = torch.randperm(n, generator=generator)
            cursor = 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        x, y = images[idx], labels[idx]
        if augment:
            x = augment_digits(x, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted class ``LongTensor [N]`` for ``images [N, 1, 32, 32]`` (model switched to eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def evaluate_classifier(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Accuracy in [0, 1] of ``model`` on ``images [N, 1, 32, 32]`` with ``labels [N]``."""
    if len(images) == 0:
        raise ValueError("evaluate_classifier needs at least one image")
    pred = predict(model, images, batch_size)
    return float((pred == labels.cpu()).to(torch.float64).mean())


def load_or_train_judge(path: str | Path, images: Tensor, labels: Tensor, steps: int = 800,
                        progress: bool = True) -> DigitClassifier:
    """The judge CNN saved at `path`, or trained (seed 0) on `images`/`labels` and saved there."""
    from ..ldm.build import load_strict
    from ..ldm.checkpoint import load_checkpoint, save_checkpoint

    path = Path(path)
    if path.exists():
        tensors, _ = load_checkpoint(path)
        model = DigitClassifier()
        load_strict(model, tensors, "judge")
        return model.eval()
    model = train_classifier(images, labels, steps=steps, generator=torch.Generator().manual_seed(0),
                             progress=progress)
    save_checkpoint(path, model.state_dict(), {"kind": "digit_classifier"})
    return model.eval()
