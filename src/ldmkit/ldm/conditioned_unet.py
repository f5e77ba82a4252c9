"""The network a sampler and the training objective call: the UNet with its conditioner in front.

One module for both sides, so that training (AdamW, EMA, checkpoints) and inference (the pipeline, exports)
hold exactly the same parameters under the same names. Its output is the UNet's raw prediction (eps, x0 or v,
per the model's parameterisation); `diffusion.parameterization` turns it into the x0 that samplers consume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class ConditionedUNet(nn.Module):
    """The trainable part of stage 2: UNet plus (optional) conditioner, one module for EMA and AdamW.

    `key` says where the conditioner's output goes (LDM's conditioning_key): cross-attention context
    ("crossattn", "hybrid") or channels concatenated to x ("concat", e.g. the SpatialRescaler's maps).
    """

    def __init__(self, unet: nn.Module, conditioner: nn.Module | None, key: str | None = "crossattn") -> None:
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.key = key
        # what runs the UNet at inference: None = the module itself; the pipeline's enable_cuda_graphs sets a
        # nn.cuda_graph.CUDAGraphRunner over it (a plain attribute: no state_dict entry)
        self.unet_runner: Callable[..., Tensor] | None = None

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None, *, context: Tensor | None = None,
                concat: Tensor | None = None) -> Tensor:
        """labels go through the conditioner; `context` (cross-attention tokens, e.g. precomputed text
        embeddings) and `concat` (channels stacked onto x: LDM's conditioning_key "concat"/"hybrid") are
        passed as they are."""
        if labels is not None and self.conditioner is not None:
            out = self.conditioner(labels)
            if self.key == "concat":
                concat = out if concat is None else torch.cat([concat, out], dim=1)
            elif context is None:
                context = out
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # [B, C + C_cond, h, w]
        run = self.unet_runner if self.unet_runner is not None and not torch.is_grad_enabled() else self.unet
        return run(x, t, context=context)


def is_frozen(module: nn.Module | None) -> bool:
    """A conditioner with no trainable parameters (a pretrained text encoder): kept out of AdamW and EMA."""
    return module is not None and not any(p.requires_grad for p in module.parameters())
