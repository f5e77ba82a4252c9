"""Every conditioning task trains end to end on real offline data and uses its condition.

Each test trains a tiny model briefly (stage 1 and stage 2, as `ldmkit train` does) and checks that the
denoising loss with the right condition is clearly below the loss with another example's condition
(`evaluation.condition_use.condition_gap`), that samples follow the condition, and that bad inputs get a
clear error. The measured figures of the full presets are in benchmarks/tasks.py and the README.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ldmkit.config import load_config
from ldmkit.data.datasets import load_task_data
from ldmkit.evaluation.condition_use import condition_gap
from ldmkit.jobs.train import train_ldm
from ldmkit.pipeline import LatentDiffusionPipeline

TINY = {
    "train_autoencoder.steps": 40, "train_autoencoder.batch_size": 32, "train_autoencoder.warmup_steps": 10,
    "train_diffusion.steps": 200, "train_diffusion.batch_size": 32, "train_diffusion.warmup_steps": 20,
    "data.limit": 512,
}
# 32 px canvases with one or two digits: the layout and semantic tasks at test size
SMALL_CANVAS = {"data.resolution": 32, "data.digits": [1, 2], "unet.model_channels": 32, "unet.image_size": 8,
                "unet.channel_mult": [1, 2], "unet.attention_resolutions": [2], "autoencoder.ch_mult": [1, 2, 2],
                "autoencoder.z_channels": 3, "autoencoder.embed_dim": 3, "unet.out_channels": 3}


def train(tmp_path_factory: pytest.TempPathFactory, preset: str, **extra: object) -> tuple[Any, ...]:
    overrides = {**TINY, **extra}
    run = tmp_path_factory.mktemp(preset)
    train_ldm(preset, run, overrides=overrides, progress=False, log=lambda *a: None)
    cfg = load_config(preset, overrides)
    return LatentDiffusionPipeline.from_pretrained(run), load_task_data(cfg, "test"), run


def same_noise_other_condition(pipe: LatentDiffusionPipeline, one: dict[str, Any], other: dict[str, Any],
                               **kw: Any) -> float:
    """Mean |difference| of two samples drawn from the same noise under two conditions.

    Each call samples one image with the same seed: the same x_T and sampler noise (a batch draws its items'
    noise from one generator in turn, so item 0 and item 1 of a batch never share it). A model that ignored its
    condition would give 0 here, which is checked: with the UNet's cross-attention context zeroed (a
    condition-blind model) the two conditions give bit-identical pictures.
    """
    a = pipe.sample(**one, **kw)
    assert torch.equal(a, pipe.sample(**one, **kw))  # the same seed and condition: the same picture
    b = pipe.sample(**other, **kw)
    unet = pipe.net.unet
    forward = unet.forward
    unet.forward = lambda x, t, context=None: forward(x, t, context=torch.zeros_like(context))
    try:
        blind = pipe.sample(**one, **kw), pipe.sample(**other, **kw)
    finally:
        del unet.forward  # the instance attribute: the class's forward again
    assert torch.equal(*blind)  # the noise is the same: only the condition can tell a from b
    return float((a - b).abs().mean())


@pytest.fixture(scope="module")
def sr(tmp_path_factory):
    return train(tmp_path_factory, "mnist_sr")


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    return train(tmp_path_factory, "mnist_inpaint")


def test_super_resolution_uses_the_low_res_input(sr):
    pipe, data, _ = sr
    gap = condition_gap(pipe, data, n=64)
    assert gap["ratio"] < 0.6, gap  # the low-res digit pins the latent down: 0.52-0.55 over condition_gap's seeds 0-3
    from ldmkit.data.degradations import bicubic_downsample

    low = bicubic_downsample(data.images[:4])  # [4, 1, 8, 8]
    out = pipe.sample(lowres=low, steps=10, seed=0)
    assert out.shape == (4, 1, 32, 32)
    # each sample agrees with its own low-res input: downsampled, it is closer to it than to the other inputs
    err = (bicubic_downsample(out)[:, None] - low[None]).abs().flatten(2).mean(2)  # [sample, input]
    own, other = err.diag().mean(), (err.sum() - err.diag().sum()) / 12
    # own / other 0.78-0.82 here over seeds 0-3 (0.69-0.94 on images 4-11): this tiny model's 40-step autoencoder
    # blurs what it decodes; a model ignoring the low-res input scores 1 on average
    assert own < 0.9 * other, err
    with pytest.raises(ValueError, match="give a low-resolution image"):
        pipe.sample(n=2, steps=2)
    with pytest.raises(ValueError, match=r"lowres must be \[B, 1, H, W\]"):
        pipe.sample(lowres=torch.zeros(1, 3, 8, 8), steps=2)
    with pytest.raises(ValueError, match="classifier-free guidance is not available"):
        pipe.sample(lowres=low, steps=2, guidance=3.0)
    with pytest.raises(ValueError, match="not divisible"):
        pipe.sample(lowres=torch.zeros(1, 1, 9, 9), steps=2)


def test_inpainting_fills_holes_and_keeps_the_rest(inpaint):
    from ldmkit.data.masks import box_mask

    pipe, data, _ = inpaint
    gap = condition_gap(pipe, data, n=64)
    assert gap["ratio"] < 0.95, gap
    x = data.images[:4]
    mask = box_mask(4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pipe.sample(image=x, mask=mask, steps=10, seed=0)
    assert torch.equal(out * (1 - mask), x * (1 - mask))  # the known pixels are pasted back exactly
    raw = pipe.sample(image=x, mask=mask, steps=10, seed=0, paste=False)
    assert not torch.equal(raw, out)
    with pytest.raises(ValueError, match="give an image and a mask"):
        pipe.sample(n=1, steps=2)
    with pytest.raises(ValueError, match="mask must be"):
        pipe.sample(image=x, mask=torch.ones(4, 1, 16, 16), steps=2)
    with pytest.raises(ValueError, match="mask is empty"):
        pipe.sample(image=x, mask=torch.zeros(4, 1, 32, 32), steps=2)


def test_img2img_strength_controls_how_far_samples_move(sr):
    """SDEdit on a model with no image input: a low strength stays near the input, a high one moves away."""
    pipe, data, _ = sr
    from ldmkit.data.degradations import bicubic_downsample

    x = data.images[:4]
    low = bicubic_downsample(x)
    # distances to the autoencoder's own reconstruction of x, what strength -> 0 returns: the distance to x itself
    # is mostly this 40-step autoencoder's blur (0.13-0.20 at any strength up to 0.5)
    with torch.no_grad():
        recon = pipe.codec.decode(pipe.codec.scale(pipe.codec.posterior(x).mode())).clamp(-1, 1)
    dist = []
    for strength in (0.2, 0.5, 0.9):
        out = pipe.sample(lowres=low, image=x, strength=strength, steps=10, seed=1, sampler="ddim", eta=0.0)
        assert out.shape == x.shape
        dist.append(float((out - recon).abs().mean()))
    # measured over seeds 0-3 and images 0-3, 4-7, 8-11: 0.020-0.031, 0.028-0.047, 0.083-0.160; each step up at
    # least x1.24 and x2.0 (a sampler ignoring strength gives one distance for all three)
    assert dist[0] < 0.05 and dist[1] > 1.1 * dist[0] and dist[2] > 1.5 * dist[1], dist
    with pytest.raises(ValueError, match="strength must be in"):
        pipe.sample(lowres=low, image=x, strength=1.5, steps=2)
    with pytest.raises(ValueError, match="needs a mask|needs an image"):
        pipe.sample(lowres=low, strength=0.5, steps=2)


def test_mask_inpainting_on_a_model_without_an_image_input(sr):
    """Any model can inpaint through the sampler (LDM's DDIM mask / x0): the known region is kept."""
    pipe, data, _ = sr
    from ldmkit.data.degradations import bicubic_downsample
    from ldmkit.data.masks import box_mask

    x = data.images[:2]
    mask = box_mask(2, 32, 32, generator=torch.Generator().manual_seed(3))
    out = pipe.sample(lowres=bicubic_downsample(x), image=x, mask=mask, steps=10, seed=0)
    assert torch.equal(out * (1 - mask), x * (1 - mask))


@pytest.fixture(scope="module")
def semantic(tmp_path_factory):
    return train(tmp_path_factory, "mnist_semantic", **{**SMALL_CANVAS, "unet.attention_resolutions": [],
                                                        "conditioning.n_stages": 2, "unet.in_channels": 6})


def test_semantic_synthesis_follows_the_map_at_any_size(semantic):
    from ldmkit.evaluation.layout_eval import segmap_iou

    pipe, data, _ = semantic
    gap = condition_gap(pipe, data, n=64)
    assert gap["ratio"] < 0.95, gap
    seg = data.segmaps[:4]
    out = pipe.sample(segmap=seg, steps=10, seed=0)
    # a model this small draws faint strokes: ink is what rises above the samples' mean, for both maps alike
    ink = float(out.mean())
    right = segmap_iou(out, seg, threshold=ink)
    wrong = segmap_iou(out, seg.roll(1, 0), threshold=ink)
    assert right > wrong, (right, wrong)
    big = torch.zeros(1, 64, 64, dtype=torch.long)
    big[0, :32, :32], big[0, 32:, 32:] = seg[0], seg[1]
    assert pipe.sample(segmap=big, steps=4).shape == (1, 1, 64, 64)  # convolutional sampling at 2x
    with pytest.raises(ValueError, match="out of range"):
        pipe.sample(segmap=torch.full((1, 32, 32), 11), steps=2)
    with pytest.raises(ValueError, match="not divisible"):
        pipe.sample(segmap=torch.zeros(1, 30, 30, dtype=torch.long), steps=2)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    # cross-attention conditions take longer to learn than concatenated maps: more steps, a higher rate
    return train(tmp_path_factory, "mnist_layout", **{**SMALL_CANVAS, "conditioning.layout_objects": 2,
                                                      "unet.in_channels": 3,
                                                      "train_diffusion.steps": 500, "train_diffusion.lr": 0.002})


def test_layout_to_image_uses_the_layout(layout):
    pipe, data, _ = layout
    gap = condition_gap(pipe, data, n=64)
    # 0.962-0.975 measured over condition_gap's seeds 0-3 (0.975 at seed 0); a model ignoring the layout scores
    # exactly 1.0 (the same t and noise under both conditions)
    assert gap["ratio"] < 0.99, gap
    diff = same_noise_other_condition(pipe, {"layout": data.layouts[:1]}, {"layout": data.layouts[1:2]},
                                      steps=6, seed=0, guidance=2.0)
    # the layout moves this tiny model's samples only a little: mean |difference| 0.9e-4 to 3e-4 of the [-1, 1]
    # range over seeds 0-3 and three layout pairs (another seed moves them 0.024-0.045); a condition-blind model
    # gives exactly 0
    assert diff > 2e-5, diff
    with pytest.raises(ValueError, match="unknown class 12"):
        pipe.sample(layout=[[(12, 0.1, 0.1, 0.5, 0.5)]], steps=2)
    with pytest.raises(ValueError, match="x0 < x1"):
        pipe.sample(layout=[[(1, 0.6, 0.1, 0.5, 0.5)]], steps=2)
    with pytest.raises(ValueError, match="takes no prompts"):
        pipe.sample(prompt=["a seven"], steps=2)


@pytest.mark.parametrize("preset", ["emoji_text_bert", "emoji_text_minilm"])
def test_text_to_image_on_emoji_uses_the_caption(tmp_path_factory, preset):
    pytest.importorskip("emoji")
    from ldmkit.data.emoji import emoji_dataset

    try:
        emoji_dataset(16)
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"emoji data unavailable: {e}")
    small = {"data.resolution": 16, "data.limit": 64, "unet.model_channels": 32, "unet.image_size": 4,
             "autoencoder.ch": 32, "train_diffusion.steps": 400, "train_diffusion.lr": 0.002}
    if preset == "emoji_text_bert":
        # a trainable encoder must learn every token from scratch: 8 captions are what a test-sized run can
        # tell apart (64 need a few thousand steps; the frozen, pretrained MiniLM separates 64 at once)
        small.update({"conditioning.n_layer": 1, "data.limit": 8})
    pipe, _, _ = train(tmp_path_factory, preset, **small)
    cfg = load_config(preset, {**TINY, **small})
    data = load_task_data(cfg, "train")  # the captions it learnt: does it tell them apart?
    gap = condition_gap(pipe, data, n=64)
    assert gap["ratio"] < 0.8, gap  # measured 0.63 (BERT) and 0.61 (MiniLM); a caption-blind model scores 1.0
    assert pipe.sample(prompt=data.captions[:2], steps=2).shape == (2, 3, 16, 16)
    # "3rd place medal" vs "a button (blood type)": mean |difference| 0.47-0.50 (BERT) and 0.22-0.25 (MiniLM) over
    # seeds 0-3 (another seed with the same caption: 0.02-0.08); a condition-blind model gives exactly 0. (Captions
    # 0 and 1, "1st/2nd place medal", draw nearly the same picture: 0.004-0.033.)
    diff = same_noise_other_condition(pipe, {"prompt": data.captions[2:3]}, {"prompt": data.captions[3:4]},
                                      steps=4, seed=0, guidance=3.0)
    assert diff > 0.1, diff
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe.sample(prompt=[" "], steps=2)
    with pytest.raises(ValueError, match="give prompts"):
        pipe.sample(n=2, steps=2)


def test_cli_samples_every_spatial_condition(sr, inpaint, tmp_path, capsys):
    """`ldmkit sample` reads --lowres / --image --mask / --strength from image files, and says what is wrong."""
    from PIL import Image

    from ldmkit.cli.main import main
    from ldmkit.data.images import to_uint8

    _, data, sr_run = sr
    _, _, inpaint_run = inpaint
    x = data.images[:1]
    Image.fromarray(to_uint8(x)[0].squeeze(-1)).save(tmp_path / "digit.png")
    Image.fromarray(to_uint8(torch.nn.functional.avg_pool2d(x, 4))[0].squeeze(-1)).save(tmp_path / "low.png")
    hole = torch.zeros(32, 32, dtype=torch.uint8)
    hole[8:20, 8:20] = 255
    Image.fromarray(hole.numpy()).save(tmp_path / "mask.png")
    out = tmp_path / "g.png"
    common = ["--out", str(out), "--steps", "3", "--n", "2"]
    assert main(["sample", "--checkpoint", str(sr_run), "--lowres", str(tmp_path / "low.png"), *common]) == 0
    assert Image.open(out).size[0] > 64
    assert main(["sample", "--checkpoint", str(inpaint_run), "--image", str(tmp_path / "digit.png"),
                 "--mask", str(tmp_path / "mask.png"), *common]) == 0
    assert main(["sample", "--checkpoint", str(sr_run), "--lowres", str(tmp_path / "low.png"),
                 "--image", str(tmp_path / "digit.png"), "--strength", "0.5", *common]) == 0
    capsys.readouterr()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cases = [
        (["--checkpoint", str(sr_run), "--lowres", str(tmp_path / "bad.png")], "not a readable image"),
        (["--checkpoint", str(sr_run), "--lowres", str(tmp_path / "nope.png")], "file not found"),
        (["--checkpoint", str(inpaint_run), "--mask", str(tmp_path / "mask.png")], "--mask needs --image"),
        (["--checkpoint", str(inpaint_run)], "give an image and a mask"),
        (["--checkpoint", str(sr_run), "--layout", "3:0.1,0.1"], "each object needs a class and 4 box"),
        (["--checkpoint", str(sr_run), "--layout", "x"], "--layout expects"),
    ]
    for args, needle in cases:
        assert main(["sample", *args, *common]) != 0
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_pipeline_call_takes_pictures_for_every_task(sr, inpaint, semantic, layout):
    """`pipe(...)` with PIL pictures / arrays for each spatial task; image i has seed + i on every task."""
    import numpy as np
    from PIL import Image

    from ldmkit.data.images import to_uint8

    def same(a: Image.Image, b: Image.Image) -> bool:
        return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1

    pipe, data, _ = sr
    low = Image.fromarray(to_uint8(torch.nn.functional.avg_pool2d(data.images[:1], 4))[0].squeeze(-1))
    out = pipe(lowres=low, n=2, seed=0, steps=3)
    assert [im.size for im in out.images] == [(32, 32)] * 2 and out.seeds == [0, 1]
    assert same(out.images[1], pipe(lowres=low, seed=1, steps=3).images[0])
    from ldmkit.ui.service import PageRequest, Service

    web = Service(pipe)  # the web page's super-resolution tab: the only one an SR model offers
    assert web.tasks == ["upscale"]
    page_out, _ = web.run(PageRequest("upscale", lowres=low.convert("RGB"), steps=3, seed=1, guidance=1))
    assert same(page_out.images[0], out.images[1])

    pipe, data, _ = inpaint
    digit = Image.fromarray(to_uint8(data.images[:1])[0].squeeze(-1))
    hole = np.zeros((32, 32), dtype=np.uint8)
    hole[4:16, 4:16] = 255
    out = pipe(image=digit, mask=Image.fromarray(hole), n=2, seed=7, steps=3)
    keep = hole == 0
    assert all(np.array_equal(np.asarray(im)[keep], np.asarray(digit)[keep]) for im in out.images)
    assert same(out.images[1], pipe(image=digit, mask=Image.fromarray(hole), seed=8, steps=3).images[0])

    pipe, data, _ = semantic
    big = np.zeros((64, 64), dtype=np.uint8)
    big[:32, :32], big[32:, 32:] = data.segmaps[0].numpy(), data.segmaps[1].numpy()
    out = pipe(segmap=Image.fromarray(big), seed=0, steps=3)  # a grey PNG of class indices, at 2x
    assert out.images[0].size == (64, 64)
    web = Service(pipe)
    assert web.tasks == ["segmap"]
    page_out, _ = web.run(PageRequest("segmap", segmap=Image.fromarray(big), steps=3, seed=0, guidance=1))
    assert same(page_out.images[0], out.images[0])

    pipe, data, _ = layout
    one = [(3, 0.1, 0.1, 0.5, 0.5)]
    out = pipe(layout=one, n=2, seed=0, steps=3)
    assert len(out) == 2 and out.parameters[0]["layout"] == [[3, 0.1, 0.1, 0.5, 0.5]]
    both = pipe(layout=[one, [(7, 0.5, 0.5, 0.9, 0.9)]], seed=0, steps=3)
    assert len(both) == 2 and same(both.images[0], out.images[0])
