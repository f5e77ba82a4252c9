"""How many images an image-level call samples at once when the caller does not say.

Every image there has its own generator, so the batch size changes no pixel, only speed and memory: small
models run fastest in large batches (the demo model: 0.057 s per image at 50, 0.116 s at 8, 2 threads), large
ones must fit. The estimate takes the widest activations of the UNet and of the decoder per image, with a
margin for the maps alive at once, and fills a quarter of the free memory with them.
"""

from __future__ import annotations

import torch

from ..config import LDMConfig
from ..latent import LatentCodec

MAX_BATCH = 128  # past this a CPU gains nothing and a progress bar moves too rarely
LIVE_UNET_MAPS = 24  # maps of the widest level alive at once in a UNet step (skips, ResBlock temporaries)
LIVE_DECODER_MAPS = 6  # full-resolution maps alive at once in the decoder (input, norm, conv, upsampled copy)
SHARE_OF_FREE = 0.25


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # no /proc (macOS, Windows): assume a modest 4 GiB


def bytes_per_image(cfg: LDMConfig, codec: LatentCodec, size: tuple[int, int] | None, guided: bool) -> int:
    """Peak activation bytes one image adds: the UNet's widest maps (twice under guidance), or the decoder's
    full-resolution maps, whichever is larger (fp32)."""
    h, w = size or (cfg.data.resolution, cfg.data.resolution)
    f = codec.downsample_factor
    u, a = cfg.unet, cfg.autoencoder
    unet = (h // f) * (w // f) * u.model_channels * max(u.channel_mult) * LIVE_UNET_MAPS * (2 if guided else 1)
    decoder = h * w * a.ch * a.ch_mult[0] * LIVE_DECODER_MAPS if f > 1 else 0
    return 4 * max(unet, decoder, 1)


def auto_batch_size(cfg: LDMConfig, codec: LatentCodec, size: tuple[int, int] | None, total: int,
                    device: torch.device, guided: bool) -> int:
    """The batch size for `total` images: as many as a quarter of the free memory holds, at most MAX_BATCH."""
    fits = int(free_memory(device) * SHARE_OF_FREE) // bytes_per_image(cfg, codec, size, guided)
    return max(1, min(total, MAX_BATCH, fits))
