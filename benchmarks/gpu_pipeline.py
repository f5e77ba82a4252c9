"""The user-facing pipeline on a CUDA device: the same seed gives the same picture on CPU and GPU, per task.

For each ldmkit run directory given, `Pipeline.from_checkpoint(run, device=...)` is loaded on the CPU and
on CUDA, and the task the model does (class / text / layout prompts, super-resolution, inpainting, semantic
maps, img2img) is called with a few samplers. The script prints, per run and sampler, the largest pixel
difference (0..255) between the CPU and GPU pictures, whether batch item i equals a single run with seed i
on the GPU, and the time of one call on each device. TF32 is off so that the GPU computes in full fp32.

Without a CUDA device the script says so and exits 0.

    python benchmarks/gpu_pipeline.py runs/demo runs/tasks/sr runs/tasks/inpaint [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ldmkit import Pipeline  # noqa: E402

SAMPLERS = ("ddim", "Euler a", "DPM++ 2M Karras", "DPM++ 2M SDE")


def task_inputs(pipe: Any) -> dict[str, Any]:
    """A request for what the model does, built from its own resolution and conditioning."""
    c, res, ch = pipe.cfg.conditioning, pipe.resolution, pipe.cfg.autoencoder.in_channels
    g = torch.Generator().manual_seed(0)
    picture = (torch.rand(1, ch, res, res, generator=g) * 2 - 1).clamp(-1, 1)
    if c.kind == "image":
        return {"lowres": picture[..., :: c.sr_factor, :: c.sr_factor]}
    if c.kind == "rescaler":
        seg = torch.zeros(1, res, res, dtype=torch.long)
        seg[:, res // 4: 3 * res // 4, res // 4: 3 * res // 4] = 1
        return {"segmap": seg}
    hole = torch.zeros(1, 1, res, res)
    hole[..., res // 4: 3 * res // 4, res // 4: 3 * res // 4] = 1
    if c.kind == "first_stage":
        return {"image": picture, "mask": hole}
    if pipe.takes_prompts:
        return {"prompt": "a red heart"}
    if c.kind == "layout" or (c.kind == "bert" and not c.use_tokenizer):
        return {"layout": [(3, 0.1, 0.1, 0.6, 0.6)]}
    if pipe.n_classes:
        return {"class_label": 3}
    return {}


def check(run: str, steps: int, device: str, tokenizer: str | None) -> list[dict[str, Any]]:
    rows = []
    cpu = Pipeline.from_checkpoint(run, tokenizer=tokenizer)
    gpu = Pipeline.from_checkpoint(run, device=device, tokenizer=tokenizer)
    inputs = task_inputs(cpu)
    guidance = 1.0 if cpu.cfg.conditioning.kind in ("image", "rescaler", "first_stage") else None
    for sampler in SAMPLERS:
        args = dict(inputs, n=3, seed=7, steps=steps, sampler=sampler, guidance=guidance, batch_size=3)
        t0 = time.perf_counter()
        a = cpu(**args)
        t1 = time.perf_counter()
        b = gpu(**args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        single = gpu(**{**args, "n": 1, "seed": 9})  # = item 2 of the batch
        diff = max(int(np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int)).max())
                   for x, y in zip(a.images, b.images, strict=True))
        batch_vs_single = int(np.abs(np.asarray(b.images[2]).astype(int)
                                     - np.asarray(single.images[0]).astype(int)).max())
        rows.append({"run": run, "task": sorted(inputs) or ["unconditional"], "sampler": sampler,
                     "cpu_vs_gpu_max_pixel_diff": diff, "gpu_batch_vs_single_max_pixel_diff": batch_vs_single,
                     "cpu_s": round(t1 - t0, 3), "gpu_s": round(t2 - t1, 3)})
        print(f"{run:28s} {sampler:16s} cpu/gpu max diff {diff:3d}/255   batch item = single run: "
              f"{batch_vs_single:3d}/255   cpu {t1 - t0:6.2f} s  gpu {t2 - t1:6.2f} s", flush=True)
    # img2img through the same door, where the model can do it
    if not {"lowres", "segmap", "mask"} & set(inputs):
        img = torch.zeros(1, cpu.cfg.autoencoder.in_channels, cpu.resolution, cpu.resolution)
        a = cpu(**inputs, image=img, strength=0.5, seed=1, steps=steps, sampler="ddim", eta=0.0)
        b = gpu(**inputs, image=img, strength=0.5, seed=1, steps=steps, sampler="ddim", eta=0.0)
        diff = int(np.abs(np.asarray(a.images[0]).astype(int) - np.asarray(b.images[0]).astype(int)).max())
        rows.append({"run": run, "task": "img2img", "cpu_vs_gpu_max_pixel_diff": diff})
        print(f"{run:28s} img2img          cpu/gpu max diff {diff:3d}/255")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="ldmkit run directories")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a dry run)")
    p.add_argument("--tokenizer", default=None, help="text models: vocab.txt / BPE file (default: the wheels')")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this script compares the pipeline on CPU and GPU)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"device: {name}, torch {torch.__version__}")
    rows = [row for run in args.runs for row in check(run, args.steps, args.device, args.tokenizer)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
