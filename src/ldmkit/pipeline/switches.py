"""Speed and memory switches of the inference pipeline, each measured in benchmarks/ (docs/performance.md).

None changes what is computed beyond float rounding, except VAE tiling, whose cost in quality
`latent_tiling.py` describes. The pipeline inherits them; they only touch its UNet (`parts.unet`) and its
latent codec (`codec`).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from ..latent import LatentCodec
from ..ldm.build import LDMParts
from ..ldm.conditioned_unet import ConditionedUNet

S = TypeVar("S", bound="SpeedSwitches")


class SpeedSwitches:
    """Methods that switch how the pipeline's UNet and autoencoder run; each returns the pipeline."""

    parts: LDMParts
    codec: LatentCodec
    net: ConditionedUNet

    def enable_vae_tiling(self: S, tile_size: int | None = None, overlap: int | None = None) -> S:
        """Decode (and encode) large images in overlapping tiles of `tile_size` latent pixels (default: 512 px
        worth, 64 at f = 8; overlap a quarter of it): the decoder's memory then follows the tile, not the image.
        Images no larger than a tile decode exactly as before. See `LatentCodec.enable_tiling`."""
        t = tile_size if tile_size is not None else max(8, 512 // self.codec.downsample_factor)
        self.codec.enable_tiling(t, overlap if overlap is not None else t // 4)
        return self

    def enable_attention_slicing(self: S, slice_size: int | None = 1) -> S:
        """Attend over `slice_size` (batch, head) maps at a time (None: all at once). Memory for backends that
        build the full attention matrix; torch's CPU and flash kernels never do, so here it only costs time."""
        self.parts.unet.set_attention_slice(slice_size)
        self._reset_cuda_graphs()
        return self

    def fuse_qkv_projections(self: S, fuse: bool = True) -> S:
        """Self-attention q, k, v in one matmul over the stacked weights (checkpoint keys unchanged)."""
        if fuse:
            self.parts.unet.fuse_qkv_projections()
        else:
            self.parts.unet.unfuse_qkv_projections()
        self._reset_cuda_graphs()
        return self

    def to_channels_last(self: S) -> S:
        """UNet and autoencoder weights in channels_last (NHWC) memory format; same results."""
        for module in (self.parts.unet, self.codec):
            # torch's stubs lack Module.to's memory_format keyword, which it takes at run time
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return self

    def compile(self: S, **options: Any) -> S:
        """`torch.compile` the UNet in place (keys unchanged). The first call then compiles for minutes on a
        CPU; worth it for long GPU runs (docs/performance.md, the GPU table), not for a few CPU samples."""
        self.parts.unet.compile(**{"dynamic": False, **options})
        self._reset_cuda_graphs()
        return self

    def enable_cuda_graphs(self: S, enable: bool = True, *, max_graphs: int = 4) -> S:
        """Replay the UNet's inference calls from CUDA graphs (`nn.cuda_graph`): each input shape is captured
        once, on its first call, then every step is one launch. Same outputs as eager; on a GPU at small batch,
        where a step is bound by kernel launches, it is the largest speed-up (docs/performance.md, GPU table).
        Needs a CUDA device; calls on the CPU still run eagerly. `enable=False` drops the graphs and their memory."""
        from ..nn.cuda_graph import CUDAGraphRunner

        if not enable:
            self.net.unet_runner = None
            return self
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device, and torch sees none here")
        self.net.unet_runner = CUDAGraphRunner(self.parts.unet, max_graphs=max_graphs)
        return self

    def _reset_cuda_graphs(self) -> None:
        """Switches that change what the UNet computes or which tensors it reads invalidate captured graphs."""
        runner = getattr(self.net, "unet_runner", None)
        if runner is not None:
            runner.reset()

    def enable_low_cpu_memory(self: S) -> S:
        """Freed tensors go back to the operating system at once (glibc's malloc: `nn.host_memory`), instead of
        staying in the heap between the UNet steps and the decode: SD sampling at 512 px peaks 0.2 GiB lower
        (docs/performance.md, Stable Diffusion memory). Same results; it switches the allocator of the whole
        process, and does nothing where the C library is not glibc."""
        from ..nn.host_memory import return_freed_memory_to_os

        return_freed_memory_to_os()
        return self

    def enable_vae_slicing(self: S, slice_size: int = 1) -> S:
        """Decode `slice_size` images per decoder call instead of the whole batch (same images, less memory)."""
        self.codec.enable_slicing(slice_size)
        return self

