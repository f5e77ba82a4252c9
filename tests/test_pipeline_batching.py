"""The image-level call picks its batch size from the model's size and the free memory when not given one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldmkit.config import load_config
from ldmkit.latent import LatentCodec
from ldmkit.ldm.build import build_autoencoder
from ldmkit.pipeline import LatentDiffusionPipeline, memory


def test_auto_batch_fills_a_share_of_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    sd = load_config("sd-v1")
    with torch.device("meta"):
        codec = LatentCodec(build_autoencoder(sd), 0.18215)
    per_image = memory.bytes_per_image(sd, codec, (512, 512), guided=True)
    # SD at 512 px: the UNet's 64 x 64 x 1280 maps (twice, for guidance) outweigh the decoder's 512 x 512 x 128
    assert per_image == 4 * 64 * 64 * 1280 * memory.LIVE_UNET_MAPS * 2
    # unguided, the UNet's half (0.50 GB) falls below the decoder's 512 x 512 x 128 maps (0.81 GB)
    assert memory.bytes_per_image(sd, codec, (512, 512), guided=False) == 4 * 512 * 512 * 128 * memory.LIVE_DECODER_MAPS
    monkeypatch.setattr(memory, "free_memory", lambda device: 16 << 30)
    assert memory.auto_batch_size(sd, codec, (512, 512), 100, torch.device("cpu"), True) == (4 << 30) // per_image
    assert memory.auto_batch_size(sd, codec, (1024, 1024), 100, torch.device("cpu"), True) == 1  # never 0
    monkeypatch.setattr(memory, "free_memory", lambda device: 1 << 40)
    assert memory.auto_batch_size(sd, codec, (512, 512), 1000, torch.device("cpu"), True) == memory.MAX_BATCH
    assert memory.auto_batch_size(sd, codec, (512, 512), 5, torch.device("cpu"), True) == 5


def test_free_memory_reads_the_system() -> None:
    free = memory.free_memory(torch.device("cpu"))
    assert 1 << 26 < free < 1 << 46  # between 64 MiB and 64 TiB: a number read, not a unit mix-up


def test_unset_batch_size_gives_the_same_images_in_fewer_batches(tiny_run: Path) -> None:
    pipe = LatentDiffusionPipeline.from_checkpoint(tiny_run)
    seen: list[int] = []
    auto = pipe(class_label=[3, 5], n=6, steps=3, seed=7, callback=lambda info: seen.append(info["batches"]))
    one = pipe(class_label=[3, 5], n=6, steps=3, seed=7, batch_size=1)
    assert set(seen) == {1}  # 12 tiny images: one batch
    # every image has its own seed: the batch size changes a pixel by float rounding at most (one level)
    a, b = (torch.stack([torch.tensor(list(im.getdata())) for im in g.images]) for g in (auto, one))
    assert int((a - b).abs().max()) <= 1
    assert auto.seeds == list(range(7, 19))
