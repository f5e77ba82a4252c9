"""Own data read defensively: odd images converted, bad ones skipped and counted, caption files, tar shards,
and a training run on a folder and on shards seeded with bad files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.config import load_config
from ldmkit.data.mnist import mnist_tensor
from ldmkit.data.records import (
    BadImage,
    decode_image,
    expand_shards,
    read_caption_file,
    read_captioned,
    read_folder,
    read_shards,
)
from ldmkit.jobs.train import train_ldm


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def odd_files() -> dict[str, bytes]:
    """Good-but-odd images (converted) and bad files (skipped), as a scraped folder holds them."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent: must become white, not black
    sixteen = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))  # mid grey in 16 bit
    palette = rgb.convert("P")
    cmyk = rgb.convert("CMYK")
    good = _jpeg(rgb)
    return {
        "a_rgb.png": _png(rgb), "b_grey.png": _png(rgb.convert("L")), "c_rgba.png": _png(rgba),
        "d_16bit.png": _png(sixteen), "e_palette.png": _png(palette), "f_cmyk.jpg": _jpeg(cmyk),
        "x_truncated.jpg": good[: len(good) // 2], "y_html.jpg": b"<html>not found</html>",
        "z_tiny.png": _png(Image.new("RGB", (2, 2), (10, 20, 30))),
    }


def test_odd_images_are_converted_and_bad_ones_raise_their_reason() -> None:
    files = odd_files()
    white = decode_image(files["c_rgba.png"], 16, 3)
    assert white.shape == (3, 16, 16) and torch.allclose(white, torch.ones_like(white))
    grey = decode_image(files["d_16bit.png"], 16, 1)
    assert grey.shape == (1, 16, 16) and abs(float(grey.mean())) < 0.01  # 32768 / 65535 -> 0, not clipped to 1
    assert decode_image(files["f_cmyk.jpg"], 16, 3).shape == (3, 16, 16)
    for name, reason in (("x_truncated.jpg", "corrupt"), ("y_html.jpg", "unreadable"), ("z_tiny.png", "tiny")):
        with pytest.raises(BadImage) as e:
            decode_image(files[name], 16, 3, name=name)
        assert e.value.reason == reason and name in str(e.value)


def test_a_folder_with_bad_files_reads_the_good_ones_and_counts_the_rest(tmp_path: Path) -> None:
    for name, data in odd_files().items():
        (tmp_path / name).write_bytes(data)
    own = read_folder(tmp_path, 16, 3)
    assert own.images.shape == (6, 3, 16, 16)
    assert dict(own.report.counts) == {"corrupt": 1, "unreadable": 1, "tiny": 1}
    assert "x_truncated.jpg" in own.report.summary()
    with pytest.raises(ValueError, match="no usable images"):
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "y.jpg").write_bytes(b"nope")
        read_folder(bad, 16, 3)


def test_caption_files_jsonl_and_csv(tmp_path: Path) -> None:
    files = odd_files()
    for name in ("a_rgb.png", "x_truncated.jpg"):
        (tmp_path / name).write_bytes(files[name])
    (tmp_path / "c.jsonl").write_text('{"file": "a_rgb.png", "caption": "noise"}\n\n'
                                      '{"path": "x_truncated.jpg", "text": "broken"}\n'
                                      '{"image": "gone.png", "caption": "missing"}\n')
    own = read_captioned(tmp_path / "c.jsonl", 16, 3)
    assert own.captions == ["noise"] and dict(own.report.counts) == {"corrupt": 1, "missing": 1}
    (tmp_path / "c.csv").write_text('file,caption\na_rgb.png,"a, comma"\n')
    assert read_caption_file(tmp_path / "c.csv") == [(tmp_path / "a_rgb.png", "a, comma")]
    (tmp_path / "bad.jsonl").write_text('{"file": "a_rgb.png"}\n')
    with pytest.raises(ValueError, match="row 1 needs a file"):
        read_caption_file(tmp_path / "bad.jsonl")


def write_mnist_shards(folder: Path, n_per_shard: int = 100, shards: int = 2) -> list[int]:
    """MNIST digits as webdataset shards (png + txt caption + cls), one bad image and one image-less sample
    in the first shard, the last shard truncated mid-file. Returns the labels written whole."""
    x, y = mnist_tensor("train")
    folder.mkdir(parents=True, exist_ok=True)
    words = "zero one two three four five six seven eight nine".split()
    labels = []
    for s in range(shards):
        path = folder / f"part-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * n_per_shard, (s + 1) * n_per_shard):
                img = Image.fromarray(((x[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8))
                data = {"png": _png(img), "txt": f"a handwritten {words[int(y[i])]}".encode(),
                        "cls": str(int(y[i])).encode()}
                if s == 0 and i == 3:
                    data["png"] = b"\x89PNG broken"
                if s == 0 and i == 4:
                    data = {"txt": b"a caption without its image"}
                for ext, payload in data.items():
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                if not (s == 0 and i in (3, 4)):
                    labels.append(int(y[i]))
    last = folder / f"part-{shards - 1:03d}.tar"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a download cut short
    return labels


def test_tar_shards_stream_samples_and_survive_a_truncated_shard(tmp_path: Path) -> None:
    write_mnist_shards(tmp_path / "shards")
    assert len(expand_shards(str(tmp_path / "shards" / "part-{000..001}.tar"))) == 2
    own = read_shards(str(tmp_path / "shards" / "part-{000..001}.tar"), 32, 1)
    counts = dict(own.report.counts)
    assert counts.pop("unreadable") == 1 and counts.pop("no image") == 1 and counts.pop("damaged shard") == 1
    assert 98 + 30 <= len(own.images) < 198  # all of shard 0 but two, part of the truncated shard 1
    assert own.captions is not None and own.captions[0] == "a handwritten " + ["zero", "one", "two", "three",
                                                                                "four", "five", "six", "seven",
                                                                                "eight", "nine"][own.labels[0]]
    assert read_shards(str(tmp_path / "shards"), 32, 1, limit=10).images.shape == (10, 1, 32, 32)
    with pytest.raises(FileNotFoundError, match="no shards match"):
        read_shards(str(tmp_path / "none-*.tar"), 32, 1)


def test_training_on_shards_with_bad_samples_reports_what_it_skipped(tmp_path: Path) -> None:
    labels = write_mnist_shards(tmp_path / "shards")
    over = {"data.name": "shards", "data.root": str(tmp_path / "shards"), "train_autoencoder.steps": 4,
            "train_diffusion.steps": 4}
    run = train_ldm(load_config("mnist_tiny", over), tmp_path / "run", progress=False, log=lambda s: None)
    report = json.loads((run / "data_report.json").read_text())
    assert report["skipped"] == 3 and report["by_reason"]["damaged shard"] == 1
    assert (run / "ldm.safetensors").exists()
    assert len(labels) > 100


def write_clean_shards(folder: Path, shards: int = 4, per_shard: int = 40) -> None:
    """MNIST digits with captions and classes, all whole."""
    x, y = mnist_tensor("train")
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"s-{s:02d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                img = Image.fromarray(((x[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8))
                for ext, payload in (("png", _png(img)), ("cls", str(int(y[i])).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_a_shard_stream_splits_ranks_crosses_epochs_and_resumes_at_the_next_sample(tmp_path: Path) -> None:
    from ldmkit.data.stream import ShardStream

    write_clean_shards(tmp_path)
    x, y = mnist_tensor("train")
    ranks = [ShardStream(str(tmp_path), 32, 1, rank=r, world_size=2) for r in range(2)]
    seen = [r.take(80)[1] for r in ranks]  # one epoch: two shards per rank
    assert ranks[0].epoch == ranks[1].epoch == 0 and ranks[0].shard_pos == 1
    assert sorted(ranks[0].order(0) + ranks[1].order(0)) == sorted(str(p) for p in tmp_path.glob("*.tar"))
    images, labels, _ = ranks[0].take(50)  # on into epoch 1
    assert ranks[0].epoch == 1 and images.shape == (50, 1, 32, 32)
    assert torch.equal(images[0], x[int(ranks[0].order(1)[0][-6:-4]) * 40])  # epoch 1 starts a shard afresh
    state = ranks[0].state_dict()
    after = ranks[0].take(20)[0]
    again = ShardStream(str(tmp_path), 32, 1, rank=0, world_size=2)
    again.load_state_dict(state)
    assert torch.equal(again.take(20)[0], after)
    assert len(seen[0]) == len(seen[1]) == 80
    with pytest.raises(ValueError, match="4 shard"):
        ShardStream(str(tmp_path), 32, 1, rank=0, world_size=5)


def test_streamed_training_resumes_bitwise_and_reports(tmp_path: Path, monkeypatch) -> None:
    """data.stream: both stages read the shards as they go; a run stopped in each stage and rerun ends
    bitwise equal to an uninterrupted one (the stream position is in the checkpoint)."""
    from ldmkit.ldm.checkpoint import load_state
    from ldmkit.training.loop import Progress

    write_clean_shards(tmp_path / "shards")
    over = {"data.name": "shards", "data.root": str(tmp_path / "shards"), "data.stream": True,
            "train_autoencoder.steps": 6, "train_autoencoder.checkpoint_every": 3, "train_autoencoder.batch_size": 16,
            "train_diffusion.steps": 8, "train_diffusion.checkpoint_every": 3, "train_diffusion.batch_size": 16}
    cfg = load_config("mnist_tiny", over)
    full = train_ldm(cfg, tmp_path / "full", progress=False, log=lambda s: None)
    original = Progress.update
    stops = {"autoencoder": 5, "diffusion": 7}

    def interrupting(self, step, *args, **kwargs):
        original(self, step, *args, **kwargs)
        if stops.get(self.desc) == step:
            del stops[self.desc]
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", interrupting)
    part = tmp_path / "part"
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            train_ldm(cfg, part, progress=False, log=lambda s: None)
    train_ldm(cfg, part, progress=False, log=lambda s: None)
    a, _ = load_state(full / "ldm_train.safetensors")
    b, _ = load_state(part / "ldm_train.safetensors")
    assert a["data"] == b["data"] and a["data"][0]["consumed"] > 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert json.loads((full / "data_report.json").read_text())["skipped"] == 0


def test_training_on_a_folder_of_odd_and_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in odd_files().items():
        (folder / name).write_bytes(data)
    over = {"data.name": "folder", "data.root": str(folder), "train_autoencoder.steps": 3,
            "train_autoencoder.batch_size": 4, "train_diffusion.steps": 3, "train_diffusion.batch_size": 4}
    logs: list[str] = []
    run = train_ldm(load_config("mnist_tiny", over), tmp_path / "run", progress=False, log=logs.append)
    report = json.loads((run / "data_report.json").read_text())
    assert report["skipped"] == 3 and report["by_reason"] == {"corrupt": 1, "unreadable": 1, "tiny": 1}
    assert any("data: 6 images" in line for line in logs) and any("skipped 3" in line for line in logs)
    assert (run / "ldm.safetensors").exists()
