"""`Pipeline.__call__`: PIL in, PIL out, one seed per image, parameters that travel with the picture.

The spatial tasks (super-resolution, inpainting models, semantic maps, layouts) are called through the same
API in test_tasks.py; the CLI's use of it is in test_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shape_picture
from ldmkit import Pipeline
from ldmkit.pipeline.generation import read_parameters
from ldmkit.pipeline.images import image_tensor


@pytest.fixture(scope="module")
def class_pipe(tiny_run):
    return Pipeline.from_checkpoint(tiny_run)


@pytest.fixture(scope="module")
def text_pipe(text_run):
    return Pipeline.from_checkpoint(text_run, device="cpu")


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(int)


@pytest.mark.parametrize("sampler", [None, "Euler a", "DPM++ 2M SDE Karras", "plms"])
def test_batch_item_i_equals_a_single_run_with_seed_i(class_pipe, sampler):
    """Stochastic samplers included: every image draws x_T and its per-step noise from its own generator."""
    out = class_pipe(class_label=[3, 7], n=2, seed=5, steps=4, sampler=sampler, batch_size=3)
    assert len(out) == 4 and out.seeds == [5, 6, 7, 8]
    assert [p["class_label"] for p in out.parameters] == [3, 3, 7, 7]  # n images per condition, in order
    for i, label in enumerate([3, 3, 7, 7]):
        alone = class_pipe(class_label=label, seed=5 + i, steps=4, sampler=sampler)
        assert np.abs(_arr(out.images[i]) - _arr(alone.images[0])).max() <= 1  # batching changes no picture
    again = class_pipe(class_label=[3, 7], n=2, seed=5, steps=4, sampler=sampler, batch_size=4)
    # oneDNN may block a batch of 3 and of 4 differently: float rounding can move a pixel by one level (a CI run
    # saw it once with DPM++ 2M SDE Karras), never more
    assert all(np.abs(_arr(a) - _arr(b)).max() <= 1 for a, b in zip(out.images, again.images, strict=True))
    other = class_pipe(class_label=3, seed=6, steps=4, sampler=sampler)
    assert np.abs(_arr(other.images[0]) - _arr(out.images[0])).max() > 10  # another seed, another picture


def test_outputs_latents_sizes_progress_and_saved_parameters(class_pipe, tmp_path):
    calls = []
    out = class_pipe(n=3, seed=0, steps=3, height=32, width=48, return_latents=True, batch_size=2,
                     callback=calls.append)
    assert [im.size for im in out.images] == [(48, 32)] * 3 and out.images[0].mode == "L"
    assert out.latents is not None and out.latents.shape[0] == 3 and out.latents.shape[-2:] == (8, 12)
    assert {(c["batch"], c["batches"]) for c in calls} == {(0, 2), (1, 2)}  # progress of each batch
    assert class_pipe(n=1, steps=2).latents is None
    paths = out.save(tmp_path / "outs")
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    params = read_parameters(paths[2])
    assert params["seed"] == 2 and params["steps"] == 3 and params["width"] == 48 and params["height"] == 32
    sc = class_pipe.cfg.sampling  # the config's sampler with its eta, as run
    assert params["sampler"] == sc.sampler and params["eta"] == sc.eta
    assert "Steps: 3, Sampler: ddim" in Image.open(paths[2]).text["parameters"]  # A1111's PNG-info text
    assert np.array_equal(np.asarray(Image.open(paths[1])), np.asarray(out.images[1]))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(class_label=[1, 2], image=[torch.zeros(1, 1, 32, 32)] * 3, strength=0.5), "give 1 or 3"),
    (dict(class_label=12), "class 12 is out of range"),
    (dict(prompt="a cat"), "takes no prompts"),
    (dict(image=torch.zeros(1, 1, 32, 32), strength=1.5), "strength must be in"),
    (dict(steps=0), "steps must be between"),
    (dict(height=36), "not divisible"),
    (dict(image="/nonexistent.png", strength=0.5), "image file not found"),
])
def test_bad_calls_name_the_problem(class_pipe, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        class_pipe(**{"steps": 2, **kwargs})


def test_text_prompts_img2img_and_inpainting_from_pil_images(text_pipe):
    out = text_pipe(["a red circle", "a blue bar"], negative_prompt="a green square", n=1, seed=3, steps=4)
    assert [p["prompt"] for p in out.parameters] == ["a red circle", "a blue bar"]
    assert out.parameters[0]["negative_prompt"] == "a green square"
    alone = text_pipe("a blue bar", negative_prompt="a green square", seed=4, steps=4)
    assert np.abs(_arr(out.images[1]) - _arr(alone.images[0])).max() <= 1
    plain = text_pipe("a blue bar", seed=4, steps=4)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(alone.images[0]))  # negative prompt used

    picture = shape_picture("red", "circle")  # a training picture: this tiny autoencoder knows no other kind
    # SDEdit: the higher the strength, the further from the input. Distances to the autoencoder's own
    # reconstruction, what strength -> 0 returns (the distance to the picture itself is mostly this 150-step
    # autoencoder's error: 28-33 grey levels at strengths 0.2 and 0.5 alike)
    with torch.no_grad():
        x = image_tensor(picture, 3)
        recon = text_pipe.codec.decode(text_pipe.codec.scale(text_pipe.codec.posterior(x).mode())).clamp(-1, 1)
    outs = [text_pipe("a red circle", image=picture, strength=s, seed=0, steps=10, sampler="ddim", eta=0.0)
            for s in (0.2, 0.5, 0.9)]
    dist = [float((o.tensors - recon).abs().mean()) for o in outs]
    # measured over seeds 0-3 on a red circle, a blue square and a green triangle: 0.018-0.042, 0.058-0.114,
    # 0.27-0.33; each step up at least x2.2 and x2.5 (a sampler ignoring strength gives one distance for all three)
    assert dist[0] < 0.08 and dist[1] > 1.5 * dist[0] and dist[2] > 1.5 * dist[1], dist
    assert outs[0].parameters[0]["strength"] == 0.2

    hole = np.zeros((32, 32), dtype=np.uint8)
    hole[8:24, 8:24] = 255
    filled = text_pipe("a yellow square", image=picture, mask=Image.fromarray(hole), seed=1, steps=6)
    got = _arr(filled.images[0])
    keep = hole == 0
    assert np.array_equal(got[keep], _arr(picture)[keep])  # known pixels pasted back exactly
    assert np.abs(got[~keep] - _arr(picture)[~keep]).mean() > 5  # the hole was painted anew
    with pytest.raises(ValueError, match="a prompt is empty"):
        text_pipe(" ", steps=2)
    with pytest.raises(ValueError, match="give prompts"):
        text_pipe(n=2, steps=2)


def test_speed_and_memory_switches_keep_the_pictures(tiny_run):
    """channels_last, fused QKV, attention slicing and VAE slicing change how the work is done, not the result;
    what the pipeline returns is an ordinary tensor although it ran under torch.inference_mode."""
    pipe = Pipeline.from_checkpoint(tiny_run)
    base = pipe(class_label=[3, 7], n=2, seed=5, steps=4, return_latents=True)
    assert not base.latents.is_inference() and not base.tensors.is_inference()
    base.latents.add_(1.0)  # callers may modify results in place (an inference tensor would refuse)
    fast = (Pipeline.from_checkpoint(tiny_run).to_channels_last().fuse_qkv_projections()
            .enable_attention_slicing(1).enable_vae_slicing(1))
    assert fast.parts.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    out = fast(class_label=[3, 7], n=2, seed=5, steps=4)
    np.testing.assert_allclose(out.tensors.numpy(), base.tensors.numpy(), atol=2e-4)
    with pytest.raises(ValueError, match="slice_size"):
        fast.enable_attention_slicing(0)
