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
    pipe = LatentDiffusionPipeline.from_pretrained(args.checkpoint)
    # unset sampling options come from the sampling section the model was trained with
    sc = pipe.cfg.sampling
    args.steps = sc.steps if args.steps is None else args.steps
    args.guidance = sc.guidance if args.guidance is None else args.guidance
    args.guidance_rescale = sc.guidance_rescale if args.guidance_rescale is None else args.guidance_rescale
    if args.eta is None and args.sampler is None:
        args.eta = sc.eta  # the config's eta belongs to the config's sampler
    args.sampler = sc.sampler if args.sampler is None else args.sampler
    wanted = _parse_classes(args.class_, pipe.n_classes)
    classes = None if wanted is None else [c for c in wanted for _ in range(args.n)]
    pipe.check_params(classes, args.steps, args.guidance, args.eta, args.sampler, args.guidance_rescale)
    images = pipe.sample(classes, args.n, steps=args.steps, guidance=args.guidance, eta=args.eta,
                         sampler=args.sampler, guidance_rescale=args.guidance_rescale, seed=args.seed)
    nrow = args.n if wanted is not None and len(wanted) > 1 else math.ceil(math.sqrt(len(images)))
    path = save_grid(images, args.out, nrow=nrow, scale=args.scale)
    print(f"wrote {len(images)} samples to {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    import shutil

    from ..demo import run_demo

    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    run_demo(args.out, args.config, overrides=_parse_overrides(args.set), progress=not args.quiet)
    print(f"demo finished: see {Path(args.out) / 'samples.png'} and {Path(args.out) / 'metrics.json'}")


def cmd_train(args: argparse.Namespace) -> None:
    from ..train import train_ldm

    run_dir = train_ldm(args.config, args.out, overrides=_parse_overrides(args.set), progress=not args.quiet)
    print(f"trained: {run_dir} (sample with: ldmkit sample --checkpoint {run_dir} --out grid.png)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ldmkit", description="Latent Diffusion Models: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("sample", help="sample a trained model into a PNG grid")
    s.add_argument("--checkpoint", required=True, help="run directory or ldm.safetensors file")
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
