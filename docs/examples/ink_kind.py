"""A conditioning kind written outside ldmkit, in one file: how much ink a digit has.

The condition is a picture's mean brightness mapped to [0, 1] (0 = blank, 1 = all ink). A small MLP turns it
into one cross-attention token; -1 stands for "no condition", which training drops to at the config's
cond_drop_prob so that classifier-free guidance works. Import this file, then train or sample with
`conditioning.kind: ink`; the pipeline takes the condition as `ink=[...]`.
"""

from __future__ import annotations

import torch
from torch import nn

from ldmkit.conditioning import ConditionKind, SampleConditions, register
from ldmkit.conditioning.sources import TokenCondition

NO_INK = -1.0  # the null condition


class InkEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, ink: torch.Tensor) -> torch.Tensor:
        return self.net(10 * ink)[:, None]  # [B, 1] -> [B, 1, D]: one context token (digits hold 0.05 to 0.3)


class Ink(ConditionKind):
    name = "ink"  # what a config's conditioning.kind says
    takes = frozenset({"ink"})  # the pipeline argument it reads
    description = "it is conditioned on the amount of ink"  # how a refusal names the model

    def module(self, cfg, *, pretrained=True):  # the cond stage, saved with the model as cond_stage_model.*
        return InkEncoder(cfg.unet.context_dim)

    def training_source(self, cfg, data, codec, encoder=None):  # each training batch's condition
        ink = (data.images.flatten(1).mean(1, keepdim=True) + 1) / 2  # [N, 1] in [0, 1]
        return TokenCondition(ink, torch.tensor([NO_INK]), cfg.train_diffusion.cond_drop_prob)

    def sample(self, cfg, codec, inputs, count, encode_prompts):  # a request's condition, checked
        if "ink" not in inputs.extra:
            raise ValueError("this model is conditioned on the amount of ink: give ink=[0..1, ...]")
        ink = torch.tensor([float(v) for v in inputs.extra["ink"]]).view(-1, 1)  # [B, 1]
        if not ((0 <= ink) & (ink <= 1)).all():
            raise ValueError(f"ink must be in [0, 1], got {ink.flatten().tolist()}")
        return SampleConditions({"labels": ink}, {"labels": torch.full_like(ink, NO_INK)})


register(Ink())
