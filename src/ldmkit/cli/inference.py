"""The commands that use a trained model: sample, serve, info, export. They stand on the inference side only
(the pipeline, interop, the web page), never on `training/`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import CLIError


def _parse_classes(text: str | None, n_classes: int) -> list[int] | None:
    if text is None:
        return None
    if text == "all":
        return list(range(n_classes))
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise CLIError(f"--class expects an integer, a comma list like 0,3,7, or 'all'; got {text!r}") from None


def cmd_sample(args: argparse.Namespace) -> None:
    from ..pipeline import LatentDiffusionPipeline
    from ..pipeline.images import image_tensor, index_map, mask_tensor

    _check_sample_args(args)
    prompts = _read_prompts(args)
    pipe = LatentDiffusionPipeline.from_checkpoint(args.checkpoint, device=args.device, config=args.config,
                                                   use_ema=args.use_ema, prediction=args.prediction,
                                                   tokenizer=args.tokenizer)
    if args.vae_tiling is not None:
        pipe.enable_vae_tiling(args.vae_tiling or None)
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()
    if args.low_cpu_memory:
        pipe.enable_low_cpu_memory()
    pipe.enable_vae_slicing(1)  # the batch's images decode one at a time: same pixels, less peak memory
    if pipe.takes_prompts and prompts is None:
        raise CLIError("this is a text-to-image model: give --prompt TEXT or --from-file FILE")
    if not pipe.takes_prompts and prompts is not None:
        raise CLIError(f"this model is conditioned on {pipe.conditioning!r}, not on text: drop --prompt/--from-file")
    channels = pipe.cfg.autoencoder.in_channels
    if args.mask is not None and args.image is None:
        raise CLIError("--mask needs --image (the picture whose white mask region is filled)")
    if args.strength is not None and (args.image is None or args.mask is not None):
        raise CLIError("--strength (img2img) needs --image and no --mask")
    classes = _parse_classes(args.class_, pipe.n_classes)
    out = pipe(
        prompts, negative_prompt=args.negative_prompt, class_label=classes,
        layout=None if args.layout is None else _parse_layout(args.layout),
        segmap=None if args.segmap is None else index_map(args.segmap, "--segmap"),
        lowres=None if args.lowres is None else image_tensor(args.lowres, channels, "--lowres"),
        image=None if args.image is None else image_tensor(args.image, channels, "--image"),
        mask=None if args.mask is None else mask_tensor(args.mask, "--mask"),
        strength=args.strength, n=args.n, seed=args.seed, sampler=args.sampler, steps=args.steps,
        guidance=args.guidance, guidance_rescale=args.guidance_rescale, eta=args.eta, height=args.height,
        width=args.width, batch_size=args.batch_size)
    conditions = len(out) // args.n
    nrow = args.n if conditions > 1 else math.ceil(math.sqrt(len(out)))
    written = []
    if args.outdir is not None:
        outdir = Path(args.outdir)
        start = _next_index(outdir)  # as txt2img.py: numbering goes on after the files already there
        paths = out.save(outdir, start=start)
        written.append(f"{len(paths)} PNGs {paths[0].name}..{paths[-1].name} in {outdir}")
    if not args.no_grid:
        if args.out:
            grid = Path(args.out)
        else:
            grid = Path(args.outdir) / f"grid-{_next_index(Path(args.outdir), 'grid-'):04d}.png"
        out.save_grid(grid, nrow=nrow, scale=args.grid_scale)
        written.append(f"the grid {grid}")
    print(f"wrote {len(out)} samples (seeds {out.seeds[0]}..{out.seeds[-1]}): {' and '.join(written)}")


def _check_sample_args(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.cuda_graphs and not str(args.device or "cpu").startswith("cuda"):
        raise CLIError(f"--cuda-graphs needs a CUDA device: add --device cuda (device is {args.device or 'cpu'})")
    if args.vae_tiling is not None and args.vae_tiling != 0 and args.vae_tiling < 2:
        raise CLIError(f"--vae-tiling takes a tile size of at least 2 latent pixels, got {args.vae_tiling}")
    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 0):
        raise CLIError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.guidance_rescale is not None and not 0.0 <= args.guidance_rescale <= 1.0:
        raise CLIError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if args.out is None and args.outdir is None:
        args.out = "grid.png"
    if args.out is not None and Path(args.out).suffix.lower() != ".png":
        raise CLIError(f"--out must end in .png, got {args.out}")
    if args.no_grid and args.outdir is None:
        raise CLIError("--no-grid needs --outdir (otherwise nothing would be written)")
    if args.prompt is not None and args.from_file is not None:
        raise CLIError("give --prompt or --from-file, not both")
    if (args.prompt is not None or args.from_file is not None) and args.class_ is not None:
        raise CLIError("give a prompt or --class, not both")
    for flag, value in (("--size", args.size), ("--height", args.height), ("--width", args.width)):
        if value is not None and value < 8:
            raise CLIError(f"{flag} must be >= 8 pixels, got {value}")
    if args.size is not None:
        args.height = args.height or args.size
        args.width = args.width or args.size
    if args.grid_scale < 1:
        raise CLIError(f"--grid-scale must be >= 1, got {args.grid_scale}")


def _read_prompts(args: argparse.Namespace) -> list[str] | None:
    """--prompt, or one prompt per non-empty line of --from-file (txt2img.py's --from-file)."""
    if args.from_file is None:
        return None if args.prompt is None else [args.prompt]
    try:
        lines = Path(args.from_file).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CLIError(f"--from-file not found: {args.from_file}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--from-file {args.from_file} is not a readable UTF-8 text file ({e})") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise CLIError(f"--from-file {args.from_file} holds no prompt (one per line)")
    return prompts


def _next_index(folder: Path, prefix: str = "") -> int:
    """One past the highest NNNNN in folder/<prefix>NNNNN.png (0 for a new folder)."""
    taken = [int(p.stem[len(prefix):]) for p in folder.glob(f"{prefix}*.png") if p.stem[len(prefix):].isdigit()]
    return max(taken, default=-1) + 1


def _parse_layout(text: str) -> list[tuple[int, float, float, float, float]]:
    from ..pipeline.images import parse_layout

    try:
        return parse_layout(text)
    except ValueError as e:
        raise CLIError(f"--{e}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    from ..ui.app import serve
    from ..ui.service import Limits

    for flag, value in (("--max-steps", args.max_steps), ("--max-size", args.max_size),
                        ("--max-images", args.max_images), ("--queue-size", args.queue_size)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if not Path(args.checkpoint).exists():
        raise CLIError(f"checkpoint not found: {args.checkpoint}")
    limits = Limits(max_steps=args.max_steps, max_size=args.max_size, max_images=args.max_images)
    if args.low_cpu_memory:  # this process is the server's own: its allocator may be switched before loading
        from ..nn.host_memory import return_freed_memory_to_os

        return_freed_memory_to_os()
    serve(args.checkpoint, host=args.host, port=args.port, limits=limits, device=args.device,
          tokenizer=args.tokenizer, queue_size=args.queue_size)


def cmd_info(args: argparse.Namespace) -> None:
    import json

    from ..interop.info import describe_checkpoint, format_info

    info = describe_checkpoint(args.checkpoint, check=not args.no_check)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from ..interop.diffusers_export import export_diffusers

    if args.to != "diffusers":
        raise CLIError(f"unknown export format {args.to!r} (only: diffusers)")
    report = export_diffusers(args.checkpoint, args.out, use_ema=args.use_ema, config=args.config,
                              prediction=args.prediction, scale_factor=args.scale_factor,
                              dtype=torch.float16 if args.half else None, overwrite=args.overwrite,
                              bpe_vocab=args.tokenizer)
    print(f"wrote {report.out_dir}: {', '.join(report.components)}"
          + (f" ({report.pipeline})" if report.pipeline else ""))
    for note in report.notes:
        print(f"note: {note}")
