"""Sinusoidal timestep embedding against the reference fixtures, and the ClassEmbedder conditioner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.models.conditioners import ClassEmbedder
from ldmkit.nn.embeddings import timestep_embedding

pytestmark = pytest.mark.reference  # reads tests/fixtures/reference (conftest.reference_dir)


@pytest.fixture(scope="module")
def misc(reference_dir: Path) -> dict[str, torch.Tensor]:
    # Clone: load_file tensors may share one unaligned buffer (see the fixture README).
    return {k: v.clone() for k, v in load_file(reference_dir / "parity" / "misc.safetensors").items()}


# With 160 frequencies, the float32 exp kernel of another CPU may round a frequency one ulp differently
# (<= 6e-8); at t = 999 that moves the argument by up to ~6e-5. The observed gap at dim 320 is 2.9e-5, the
# same size as the gap between the fixture and a float64 evaluation (5.2e-5), hence the looser bound.
@pytest.mark.parametrize(
    ("key", "steps", "dim", "tol"),
    [
        ("temb.openai.dim32.int", "temb.timesteps_int", 32, 1e-6),
        ("temb.openai.dim33.int", "temb.timesteps_int", 33, 1e-6),
        ("temb.openai.dim320.int", "temb.timesteps_int", 320, 1e-4),
        ("temb.openai.dim32.frac", "temb.timesteps_frac", 32, 1e-6),
    ],
)
def test_timestep_embedding_matches_reference(
    misc: dict[str, torch.Tensor], key: str, steps: str, dim: int, tol: float
) -> None:
    got = timestep_embedding(misc[steps], dim)
    expected = misc[key]
    assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
    err = (got - expected).abs().max().item()
    print(f"{key}: max abs error {err:.2e}")
    assert err <= tol, f"{key}: max abs error {err:.2e}"


def test_timestep_embedding_layout(misc: dict[str, torch.Tensor]) -> None:
    t = misc["temb.timesteps_int"]
    emb = timestep_embedding(t, 33)
    freqs = 10000.0 ** (-torch.arange(16, dtype=torch.float64) / 16)
    args = t.double()[:, None] * freqs
    torch.testing.assert_close(emb[:, :16].double(), torch.cos(args), atol=1e-4, rtol=0)
    torch.testing.assert_close(emb[:, 16:32].double(), torch.sin(args), atol=1e-4, rtol=0)
    # Cosine first: at t = 0 the first half is 1 and the second half 0; odd dims end in a zero column.
    zero = timestep_embedding(torch.tensor([0]), 33)[0]
    assert torch.equal(zero[:16], torch.ones(16)) and torch.equal(zero[16:], torch.zeros(17))
    assert torch.equal(emb[:, -1], torch.zeros(len(t)))


def test_timestep_embedding_repeat_only(misc: dict[str, torch.Tensor]) -> None:
    got = timestep_embedding(misc["temb.timesteps_int"], 32, repeat_only=True)
    expected = misc["temb.openai.dim32.int.repeat_only"]
    assert got.dtype == expected.dtype == torch.int64
    assert torch.equal(got, expected)


def test_timestep_embedding_rejects_non_1d() -> None:
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 3), 8)


# ----------------------------------------------------------------------------------------------------------
# ClassEmbedder


def test_class_embedder_shape_and_key(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "manifests" / "ldm_cin256_v2.json").read_text())
    expected = {k: v for k, v in manifest["keys"].items() if k.startswith("cond_stage_model.")}
    embedder = ClassEmbedder(n_classes=1001, embed_dim=512)
    got = {f"cond_stage_model.{k}": list(v.shape) for k, v in embedder.state_dict().items()}
    assert got == expected

    labels = torch.tensor([0, 999, 1000])
    ctx = embedder(labels)
    assert ctx.shape == (3, 1, 512)
    assert torch.equal(ctx[:, 0], embedder.embedding.weight[labels])


@pytest.mark.parametrize("bad", [-1, 10, 11])
def test_class_embedder_rejects_out_of_range(bad: int) -> None:
    embedder = ClassEmbedder(n_classes=10, embed_dim=4)
    with pytest.raises(ValueError, match=rf"class label {bad} is out of range \[0, 10\)"):
        embedder(torch.tensor([3, bad]))


def test_class_embedder_rejects_float_labels() -> None:
    with pytest.raises(ValueError, match="integer"):
        ClassEmbedder(n_classes=10, embed_dim=4)(torch.tensor([1.0]))
