"""The `ldmkit` command line: sampling writes a grid; every bad input is one clear line, no traceback."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldmkit.cli.main import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ldmkit.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_sample_writes_grid(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", "--checkpoint", str(tiny_run), "--class", "3", "--n", "4", "--steps", "5",
               "--guidance", "2", "--seed", "0", "--out", str(out), "--grid-scale", "1"])
    assert rc == 0
    img = Image.open(out)
    assert img.size == (2 + 2 * 34, 2 + 2 * 34)  # 2 x 2 grid of 32 px tiles with 2 px padding
    assert "wrote 4 samples" in capsys.readouterr().out
    rc = main(["sample", "--checkpoint", str(tiny_run), "--class", "0,1", "--n", "3", "--steps", "3",
               "--out", str(tmp_path / "rows.png"), "--grid-scale", "1"])
    assert rc == 0 and Image.open(tmp_path / "rows.png").size == (2 + 3 * 34, 2 + 2 * 34)  # a row per class
    # guidance rescale changes the picture; phi = 0 is the plain guided sample
    common = ["sample", "--checkpoint", str(tiny_run), "--class", "3", "--n", "2", "--steps", "3", "--guidance", "4",
              "--grid-scale", "1"]
    pix = {}
    for phi in ("0", "0.7"):
        assert main([*common, "--guidance-rescale", phi, "--out", str(tmp_path / f"r{phi}.png")]) == 0
        pix[phi] = np.asarray(Image.open(tmp_path / f"r{phi}.png"))
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")), pix["0"])
    assert not np.array_equal(pix["0.7"], pix["0"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--checkpoint", "{missing}"], "checkpoint not found"),
        (["--class", "10"], "class 10 is out of range"),
        (["--class", "x"], "--class expects an integer"),
        (["--steps", "0"], "steps must be between 1 and 1000"),
        (["--steps", "abc"], "invalid int value"),
        (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
        (["--n", "0"], "--n must be >= 1"),
        (["--guidance-rescale", "1.5"], "--guidance-rescale must be in [0, 1]"),
        (["--eta", "-0.5"], "eta must be >= 0"),
        (["--out", "{tmp}/grid.txt"], "--out must end in .png"),
        (["--from-file", "{tmp}/none.txt"], "--from-file not found"),
        (["--prompt", "a cat"], "not on text: drop --prompt"),
        (["--H", "4"], "--height must be >= 8"),
        (["--strength", "0.5"], "--strength (img2img) needs --image"),
        (["--vae-tiling", "1"], "--vae-tiling takes a tile size of at least 2"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_sample_errors_are_one_line(tiny_run, tmp_path, capsys, args, needle):
    base = {"--checkpoint": str(tiny_run), "--out": str(tmp_path / "g.png"), "--steps": "2"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value.format(missing=tmp_path / "nope", tmp=tmp_path)
    argv = ["sample"] + [x for kv in base.items() for x in kv]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cuda_graphs_flag_needs_a_cuda_device(tiny_run, tmp_path, capsys):
    rc = main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "g.png"), "--cuda-graphs"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--cuda-graphs needs a CUDA device: add --device cuda (device is cpu)" in err
    assert len(err.splitlines()) == 1


def test_vae_tiling_only_touches_latents_larger_than_a_tile(tiny_run, tmp_path):
    """At the model's 32 px (8 x 8 latents) an 8-pixel tile is the whole latent: the same PNG bit for bit. At 64 px
    the 16 x 16 latents decode in tiles, and the pictures change. (How close tiles come to the whole decode is
    measured on a trained autoencoder in test_vae_tiling.py: this seconds-trained one has never seen 64 px.)"""
    import numpy as np
    from PIL import Image

    def grid(name: str, *extra: str) -> np.ndarray:
        argv = ["sample", "--checkpoint", str(tiny_run), "--class", "3", "--n", "2", "--steps", "3",
                "--grid-scale", "1", "--out", str(tmp_path / f"{name}.png"), *extra]
        assert main(argv) == 0
        return np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.float64)

    assert np.array_equal(grid("whole32"), grid("tiled32", "--vae-tiling", "8"))
    whole, tiled = grid("whole64", "--size", "64"), grid("tiled64", "--size", "64", "--vae-tiling", "8")
    assert whole.shape == tiled.shape and np.abs(whole - tiled).mean() > 1


def test_mismatched_checkpoint_is_one_line(tiny_run, tmp_path, capsys):
    # an autoencoder file is not a diffusion checkpoint; a corrupt file is not a checkpoint at all
    rc = main(["sample", "--checkpoint", str(tiny_run / "autoencoder.safetensors"), "--out", str(tmp_path / "g.png")])
    assert rc != 0 and "not an ldmkit latent diffusion checkpoint" in capsys.readouterr().err
    bad = tmp_path / "ldm.safetensors"
    bad.write_bytes(b"not a checkpoint")
    rc = main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "not a readable safetensors" in err and len(err.strip().splitlines()) == 1


def test_console_entry_point_runs_as_a_process(tmp_path):
    r = _run("sample", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "g.png"))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"ldmkit: error: checkpoint not found: {tmp_path / 'none'}"]
    r = _run("--help")
    assert r.returncode == 0 and "sample" in r.stdout and "demo" in r.stdout


def test_checkpoint_that_does_not_fit_its_config_is_named(tiny_run, tmp_path, capsys):
    # a checkpoint whose weights disagree with its stored config (a hand-edited or mixed-up file)
    from ldmkit.ldm.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(tiny_run / "ldm.safetensors")
    del tensors["model.diffusion_model.out.2.weight"]
    meta["config"]["unet"]["model_channels"] = 64
    save_checkpoint(tmp_path / "ldm.safetensors", tensors, meta)
    rc = main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "UNet weights do not fit the configured model" in err
    assert "of another shape" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a", "plms", "heun"])
def test_sample_with_named_samplers(tiny_run, tmp_path, sampler):
    out = tmp_path / "s.png"
    rc = main(["sample", "--checkpoint", str(tiny_run), "--class", "1", "--n", "2", "--steps", "4",
               "--sampler", sampler, "--seed", "1", "--out", str(out)])
    assert rc == 0 and out.exists()


def test_unknown_sampler_is_one_line(tiny_run, tmp_path, capsys):
    rc = main(["sample", "--checkpoint", str(tiny_run), "--sampler", "dpm3", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown sampler 'dpm3'" in err and len(err.strip().splitlines()) == 1



def test_outdir_writes_pngs_with_their_parameters(tiny_run, tmp_path, capsys):
    """txt2img.py's layout: numbered samples that go on after the files already there, and a grid per run."""
    from ldmkit import Pipeline
    from ldmkit.pipeline.generation import read_parameters

    outdir = tmp_path / "samples"
    argv = ["sample", "--checkpoint", str(tiny_run), "--class", "3", "--n", "2", "--steps", "3", "--seed", "4",
            "--outdir", str(outdir), "--H", "32", "--W", "48", "--scale", "2", "--grid-scale", "1"]
    assert main(argv) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["00000.png", "00001.png", "grid-0000.png"]
    assert "seeds 4..5" in capsys.readouterr().out
    params = read_parameters(outdir / "00001.png")
    assert (params["seed"], params["class_label"], params["guidance"], params["width"]) == (5, 3, 2.0, 48)
    want = Pipeline.from_checkpoint(tiny_run)(class_label=3, seed=5, steps=3, guidance=2.0, height=32, width=48)
    assert np.abs(np.asarray(Image.open(outdir / "00001.png")).astype(int)
                  - np.asarray(want.images[0]).astype(int)).max() <= 1  # --scale is txt2img's guidance scale
    assert read_parameters(outdir / "grid-0000.png")["seeds"] == [4, 5]
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tiny_run), "--no-grid"]) != 0
    assert "--no-grid needs --outdir" in capsys.readouterr().err
    assert main([*argv, "--no-grid"]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                                        "grid-0000.png"]


def test_prompts_from_file(text_run, tmp_path, capsys):
    from ldmkit.pipeline.generation import read_parameters

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue bar\n")
    outdir = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(text_run), "--from-file", str(prompts), "--n", "2", "--steps", "2",
                 "--outdir", str(outdir), "--negative-prompt", "a green square"]) == 0
    got = [read_parameters(outdir / f"{i:05d}.png") for i in range(4)]
    assert [p["prompt"] for p in got] == ["a red circle", "a red circle", "a blue bar", "a blue bar"]
    assert {p["negative_prompt"] for p in got} == {"a green square"}
    assert Image.open(outdir / "grid-0000.png").size == (2 * (2 + 2 * 34),) * 2  # a row per prompt, upscaled 2x
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["sample", "--checkpoint", str(text_run), "--from-file", str(empty), "--steps", "2"]) != 0
    assert "holds no prompt" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(text_run), "--steps", "2", "--out", str(tmp_path / "g.png")]) != 0
    assert "give --prompt TEXT or --from-file" in capsys.readouterr().err
