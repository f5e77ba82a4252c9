"""The inference pipeline on original-format checkpoints: Lightning .ckpt files of our own runs, and a
text-conditioned (LD BERT) model sampled from prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ldmkit.config import ConditioningConfig, load_config
from ldmkit.ldm.build import (
    LDMParts,
    build_autoencoder,
    build_conditioner,
    build_schedule,
    build_unet,
    ldm_state_dict,
)
from ldmkit.pipeline import LatentDiffusionPipeline


def test_lightning_ckpt_of_a_run_samples_the_same_images(tiny_run: Path, tmp_path: Path) -> None:
    ours = LatentDiffusionPipeline.from_pretrained(tiny_run)
    # the run's weights already use the CompVis layout: wrapped as a Lightning pickle they are an "original" file
    tensors = load_file(str(tiny_run / "ldm.safetensors"))
    torch.save({"state_dict": tensors, "global_step": 150}, tmp_path / "last.ckpt")
    theirs = LatentDiffusionPipeline.from_checkpoint(tmp_path / "last.ckpt", config=ours.cfg)
    theirs.codec.scale_factor = ours.codec.scale_factor  # scale_by_std: the factor lives in the run's metadata
    a = ours.sample(class_label=[1, 7], steps=4, guidance=2.0, seed=3)
    b = theirs.sample(class_label=[1, 7], steps=4, guidance=2.0, seed=3)
    assert torch.equal(a, b)
    # a class-conditional model trained without a null class (LD's cin-ldm-vq-f8): no guidance, labels required
    import copy

    no_null = copy.deepcopy(ours.cfg)
    no_null.conditioning.n_classes, no_null.conditioning.null_class = 11, False  # same 11-row table
    plain = LatentDiffusionPipeline.from_checkpoint(tmp_path / "last.ckpt", config=no_null)
    assert plain.sample(class_label=[1, 7], steps=2, guidance=1.0, seed=0).shape == a.shape
    with pytest.raises(ValueError, match="no null class"):
        plain.sample(class_label=[1], steps=2, guidance=3.0)
    with pytest.raises(ValueError, match="give class labels"):
        plain.sample(n=2, steps=2)
    # `load` tells the two kinds of file apart
    assert LatentDiffusionPipeline.load(tiny_run).cfg == ours.cfg
    with pytest.raises(ValueError, match="only apply to original checkpoints"):
        LatentDiffusionPipeline.load(tiny_run, use_ema=True)


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory) -> tuple[Path, object]:
    cfg = load_config("mnist_tiny")
    cfg.conditioning = ConditioningConfig(kind="bert", embed_dim=32, n_layer=1, max_seq_len=77)
    cfg.scale_factor = 1.0
    torch.manual_seed(0)
    parts = LDMParts(build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg), build_schedule(cfg))
    with torch.no_grad():  # the UNet's zero-initialised output layers would hide the text: use random weights
        for p in parts.unet.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("bert") / "txt2img.ckpt"
    torch.save({"state_dict": ldm_state_dict(parts)}, path)
    return path, cfg


def test_text_model_tokenizes_like_bert_and_prompts_steer_samples(bert_ckpt) -> None:
    path, cfg = bert_ckpt
    pipe = LatentDiffusionPipeline.from_checkpoint(path, config=cfg)
    assert pipe.takes_prompts
    ids = pipe.tokenize(["a photo of a cat"])
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102]  # bert-base-uncased WordPiece ids
    assert int(ids[0, 7:].abs().sum()) == 0
    kw = dict(steps=3, guidance=4.0, seed=5)
    cat = pipe.sample(prompt=["a cat", "a cat"], **kw)
    assert cat.shape == (2, 1, 32, 32) and bool(((cat >= -1) & (cat <= 1)).all())
    assert torch.equal(cat, pipe.sample(prompt=["a cat", "a cat"], **kw))
    dog = pipe.sample(prompt=["a dog", "a cat"], **kw)
    assert not torch.allclose(dog[0], cat[0]) and torch.allclose(dog[1], cat[1], atol=1e-6)
    neg = pipe.sample(prompt=["a cat", "a cat"], negative_prompt="blurry", **kw)
    assert not torch.allclose(neg, cat)
    with pytest.raises(ValueError, match="takes no class labels"):
        pipe.sample(class_label=[1], steps=2)
    with pytest.raises(ValueError, match="give prompts"):
        pipe.sample(n=2, steps=2)
    with pytest.raises(ValueError, match="prompts must be strings"):
        pipe.tokenize([3])  # type: ignore[list-item]


def test_cli_samples_a_prompt_from_an_original_checkpoint(bert_ckpt, tmp_path: Path, capsys) -> None:
    from ldmkit.cli.main import main
    from ldmkit.config import to_dict

    path, cfg = bert_ckpt
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(cfg)))
    out = tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(path), "--config", str(cfg_path), "--prompt", "a red car", "--n", "2",
                 "--steps", "2", "--out", str(out), "--grid-scale", "1"]) == 0
    assert out.exists() and "wrote 2 samples" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(path), "--config", str(cfg_path), "--out", str(out)]) != 0
    assert "give --prompt" in capsys.readouterr().err


def test_sd1_style_checkpoint_samples_from_a_prompt_with_the_clip_text_model(tmp_path: Path, capsys) -> None:
    """SD 1.x layout at toy UNet/VAE size but the real CLIP ViT-L/14 text model shape (random weights)."""
    from ldmkit.cli.main import main
    from ldmkit.config import to_dict

    cfg = load_config("sd-v1")
    cfg.unet.model_channels, cfg.unet.channel_mult, cfg.unet.attention_resolutions = 32, (1, 2), (1,)
    cfg.unet.num_res_blocks, cfg.unet.num_heads, cfg.unet.use_checkpoint = 1, 2, False
    ae = cfg.autoencoder
    ae.ch, ae.ch_mult, ae.num_res_blocks = 32, (1, 2), 1
    cfg.data.resolution = 32
    torch.manual_seed(0)
    parts = LDMParts(build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg), build_schedule(cfg))
    with torch.no_grad():
        for p in parts.unet.parameters():
            p.normal_(0, 0.05)
    ckpt = tmp_path / "sd-tiny.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ldm_state_dict(parts).items()}, str(ckpt))
    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt, config=cfg)
    ids = pipe.tokenize(["a photo of a cat"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert bool((ids[0, 7:] == 49407).all())  # SD 1.x pads with the end token
    kw = dict(steps=2, guidance=7.5, seed=1)
    a = pipe.sample(prompt=["a photo of a cat"], **kw)
    b = pipe.sample(prompt=["an oil painting of a ship"], **kw)
    assert a.shape == (1, 3, 32, 32) and not torch.allclose(a, b)
    pipe.cfg.conditioning.key = "hybrid"  # an inpainting model needs its image and mask: said, not crashed
    with pytest.raises(ValueError, match="inpainting model: give an image and a mask"):
        pipe.sample(prompt=["x"], steps=1)
    pipe.cfg.conditioning.key = None
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(cfg)))
    out = tmp_path / "cat.png"
    assert main(["sample", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--prompt", "a photo of a cat",
                 "--n", "1", "--steps", "2", "--guidance", "7.5", "--seed", "1", "--out", str(out),
                 "--grid-scale", "1"]) == 0
    assert out.exists()
    # export to a diffusers folder from the same command line; a second run refuses to overwrite
    folder = tmp_path / "diffusers"
    assert main(["export", str(ckpt), str(folder), "--config", str(cfg_path)]) == 0
    assert "StableDiffusionPipeline" in capsys.readouterr().out
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in folder.iterdir()}
    assert main(["export", str(ckpt), str(folder), "--config", str(cfg_path)]) == 1
    assert "overwrite" in capsys.readouterr().err
    # a missing tokenizer file is named
    assert main(["sample", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--prompt", "x", "--steps", "1",
                 "--tokenizer", str(tmp_path / "nope.txt.gz"), "--out", str(out)]) == 1
    assert "nope.txt.gz" in capsys.readouterr().err


def _weight_span(pipe: LatentDiffusionPipeline) -> int:
    """Bytes from the lowest to the highest address that any of the pipeline's weights occupies."""
    tensors = [t for part in (pipe.parts.unet, pipe.parts.autoencoder, pipe.parts.conditioner) if part is not None
               for t in part.state_dict().values()]
    lo = min(t.untyped_storage().data_ptr() for t in tensors)
    hi = max(t.untyped_storage().data_ptr() + t.untyped_storage().nbytes() for t in tensors)
    return hi - lo


def test_every_part_takes_the_files_tensors_instead_of_copying_them(tiny_run: Path, tmp_path: Path) -> None:
    """A copy of the autoencoder's or cond stage's weights would sit beside the memory-mapped file, whose pages
    stay resident while the UNet uses them (SD at 512 px: 0.77 GiB more, docs/performance.md). Adopted, every
    weight lies inside the one mapping of the file."""
    ours = LatentDiffusionPipeline.from_pretrained(tiny_run)
    size = (tiny_run / "ldm.safetensors").stat().st_size
    assert ours.parts.conditioner is not None and _weight_span(ours) <= size
    original = tmp_path / "original.safetensors"  # the same weights as an original file: CompVis keys only
    from safetensors.torch import save_file

    save_file(load_file(str(tiny_run / "ldm.safetensors")), str(original), metadata={"format": "pt"})
    theirs = LatentDiffusionPipeline.from_checkpoint(original, config=ours.cfg)
    assert _weight_span(theirs) <= original.stat().st_size
