"""Golden outputs of the tiny presets, for refactors that must not change behaviour.

    python tests/golden/record.py OUT.safetensors          # record
    python tests/golden/record.py NEW.safetensors --compare OLD.safetensors

Trains every conditioning task's preset at a few steps (both stages, as `ldmkit train` does), keeps every
logged loss, the final weights file and one seeded sample batch per task, and writes them to one file. Two
recordings of the same code at the same thread count are bitwise equal; `--compare` says which entries differ.
Run at one thread (it sets it) so the recording does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)

SHORT = {"train_autoencoder.steps": 8, "train_autoencoder.batch_size": 8, "train_autoencoder.warmup_steps": 2,
         "train_autoencoder.checkpoint_every": 4,
         "train_diffusion.steps": 12, "train_diffusion.batch_size": 8, "train_diffusion.warmup_steps": 2,
         "train_diffusion.checkpoint_every": 5, "data.limit": 64}
CANVAS = {"data.resolution": 32, "data.digits": [1, 2], "unet.model_channels": 32, "unet.image_size": 8,
          "unet.channel_mult": [1, 2], "unet.attention_resolutions": [2], "autoencoder.ch_mult": [1, 2, 2],
          "autoencoder.z_channels": 3, "autoencoder.embed_dim": 3, "unet.out_channels": 3}
EMOJI = {"data.resolution": 16, "data.limit": 16, "unet.model_channels": 32, "unet.image_size": 4,
         "autoencoder.ch": 32}
PRESETS = {
    "mnist_tiny": {},
    "mnist_sr": {},
    "mnist_inpaint": {},
    "mnist_semantic": {**CANVAS, "unet.attention_resolutions": [], "conditioning.n_stages": 2,
                       "unet.in_channels": 6},
    "mnist_layout": {**CANVAS, "conditioning.layout_objects": 2, "unet.in_channels": 3},
    "emoji_text_minilm": EMOJI,
    "emoji_text_bert": {**EMOJI, "conditioning.n_layer": 1},
}


def sample(preset: str, run: Path, overrides: dict) -> dict[str, torch.Tensor]:
    from ldmkit.config import load_config
    from ldmkit.data.datasets import load_task_data
    from ldmkit.data.degradations import bicubic_downsample
    from ldmkit.data.masks import box_mask
    from ldmkit.pipeline import LatentDiffusionPipeline
    pipe = LatentDiffusionPipeline.from_checkpoint(run)
    data = load_task_data(load_config(preset, overrides), "test")
    x = data.images[:2]
    out: dict[str, torch.Tensor] = {}
    if preset == "mnist_tiny":
        out["class"] = pipe.sample(class_label=[3, 7], steps=4, seed=0)
        out["class_eta1"] = pipe.sample(class_label=[1, 2], steps=4, seed=1, eta=1.0, sampler="ddim")
        out["img2img"] = pipe.sample(class_label=[3, 7], image=x, strength=0.5, steps=4, seed=2)
        out["mask"] = pipe.sample(class_label=[3, 7], image=x, mask=box_mask(2, 32, 32, generator=torch.Generator()
                                                                 .manual_seed(0)), steps=4, seed=3)
        imgs = pipe(class_label=[4], n=2, steps=4, seed=5).images
        out["call"] = torch.stack([torch.tensor(list(im.getdata())) for im in imgs])
    elif preset == "mnist_sr":
        out["sr"] = pipe.sample(lowres=bicubic_downsample(x), steps=4, seed=0)
    elif preset == "mnist_inpaint":
        mask = box_mask(2, 32, 32, generator=torch.Generator().manual_seed(0))
        out["inpaint"] = pipe.sample(image=x, mask=mask, steps=4, seed=0)
    elif preset == "mnist_semantic":
        out["semantic"] = pipe.sample(segmap=data.segmaps[:2], steps=4, seed=0)
    elif preset == "mnist_layout":
        out["layout"] = pipe.sample(layout=data.layouts[:2], steps=4, seed=0, guidance=2.0)
    else:
        out["text"] = pipe.sample(prompt=["red heart", "a cat"], steps=4, seed=0, guidance=3.0)
    return out


def record(path: Path) -> None:
    from ldmkit.jobs.train import train_ldm

    tensors: dict[str, torch.Tensor] = {}
    for preset, extra in PRESETS.items():
        overrides = {**SHORT, **extra}
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / preset
            logged: list[float] = []

            def log(*args: object, logged: list[float] = logged) -> None:  # every logged number (losses, PSNR)
                for a in args:
                    logged.extend(float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", str(a)))

            train_ldm(preset, run, overrides=overrides, progress=False, log=log)
            for f in sorted(run.rglob("*.json*")):  # metrics and logs written beside the weights
                text = re.sub(r'"(time|wall|seconds|elapsed|images_per_s)[^"]*": *[0-9.e-]+', "", f.read_text())
                tensors[f"{preset}/{f.relative_to(run)}"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
            for f in sorted(run.glob("*.safetensors")):  # checkpoints/ holds copies of these
                for k, v in load_file(str(f)).items():
                    tensors[f"{preset}/{f.relative_to(run)}/{k}"] = v
            for k, v in sample(preset, run, overrides).items():
                tensors[f"{preset}/sample/{k}"] = v.float().contiguous()
            if logged:
                tensors[f"{preset}/log"] = torch.tensor(logged, dtype=torch.float64)
        print(preset, "recorded", flush=True)
    save_file(tensors, str(path))


def compare(new: Path, old: Path) -> int:
    a, b = load_file(str(new)), load_file(str(old))
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        if a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            bad.append(k)
    print(f"{len(set(a) & set(b))} entries compared; {len(bad)} differ")
    for k in bad[:50]:
        print("  differs:", k)
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--compare", type=Path)
    args = p.parse_args()
    if not args.out.exists():
        record(args.out)
    sys.exit(compare(args.out, args.compare) if args.compare else 0)
