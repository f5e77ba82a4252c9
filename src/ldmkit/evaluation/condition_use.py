"""Does a trained model use its condition? The denoising loss with the right condition vs a wrong one.

For each example, the LDM objective (eq. 2 in latent space) is evaluated twice with the same t and eps: once
with the example's own condition and once with another example's (the batch rolled by one). A model that
ignores its condition scores the same on both; one that uses it has a clearly lower loss with the right
condition. This is the test-sized counterpart of each task's figure (retrieval accuracy, box accuracy,
IoU, PSNR, hole error).
"""

from __future__ import annotations

import dataclasses

import torch

from ..conditioning import kind_of
from ..conditioning.concat import clean_latents
from ..data.datasets import TaskData
from ..diffusion.parameterization import training_target
from ..diffusion.schedules import _gather


def _subset(data: TaskData, n: int) -> TaskData:
    return TaskData(
        data.images[:n],
        None if data.labels is None else data.labels[:n],
        None if data.captions is None else list(data.captions[:n]),
        None if data.layouts is None else list(data.layouts[:n]),
        None if data.segmaps is None else data.segmaps[:n],
    )


@torch.no_grad()
def condition_gap(pipe, data: TaskData, *, n: int = 64, repeats: int = 4, seed: int = 0,  # noqa: ANN001
                  t_range: tuple[float, float] = (0.3, 0.9)) -> dict[str, float]:
    """Mean denoising loss (l2, the model's parameterisation) of `pipe`'s model on the first n examples of
    `data`, with their own conditions and with the conditions rolled by one example (a wrong but
    in-distribution condition).

    t is drawn from `t_range` (shares of T): at small t the noisy latent alone determines the answer and at
    t near T the loss is the data's variance either way, so the middle is where a condition shows.
    """
    cfg = dataclasses.replace(pipe.cfg, train_diffusion=dataclasses.replace(pipe.cfg.train_diffusion,
                                                                            cond_drop_prob=0.0))
    sub = _subset(data, n)
    if len(sub.images) < 2:
        raise ValueError("condition_gap needs at least two examples")
    kind = kind_of(cfg)
    source = kind.training_source(cfg, sub, pipe.codec, pipe.parts.conditioner if kind.frozen_encoder else None)
    if source is None:
        raise ValueError("the model is unconditional: there is no condition to test")
    gen = torch.Generator().manual_seed(seed)
    cond = source.batch(torch.arange(len(sub.images)), gen)
    wrong = {k: v.roll(1, 0) for k, v in cond.items()}
    z0 = clean_latents(pipe.codec, sub.images)
    schedule = pipe.parts.schedule
    lo, hi = (int(f * schedule.num_timesteps) for f in t_range)
    out = {}
    for name, c in (("loss", cond), ("wrong_condition_loss", wrong)):
        g = torch.Generator().manual_seed(seed + 1)  # the same t and eps for both
        losses = []
        for _ in range(repeats):
            t = torch.randint(lo, hi, (len(z0),), generator=g)
            eps = torch.randn(z0.shape, generator=g)
            x_t = schedule.q_sample(z0, t, eps)
            target = training_target(cfg.parameterization, z0, eps, _gather(schedule.alphas_cumprod, t, z0))
            losses.append(float(((pipe.net(x_t, t, **c) - target) ** 2).mean()))
        out[name] = sum(losses) / len(losses)
    out["ratio"] = out["loss"] / out["wrong_condition_loss"]
    return out
