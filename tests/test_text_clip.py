"""CLIP BPE tokenizer and Stable Diffusion's CLIP / OpenCLIP text encoders.

Tokenizer: exact ids against transformers' CLIPTokenizer built from the same vocabulary file. SD 1.x text
model: exact key set of the sd_v1 manifest and numerical parity with transformers' CLIPTextModel. SD 2.x
OpenCLIP tower: exact key set of the sd_v2_v manifest and parity with attention written out by hand here.
"""

from __future__ import annotations

import gzip
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from ldmkit.models.text_clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextTransformer,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
    OpenCLIPTextConfig,
    clip_text_keys_from_transformers,
)
from ldmkit.text import EOT_ID, SOT_ID, VOCAB_FILE_NAME, CLIPTokenizer, default_vocab_path
from ldmkit.text.clip_bpe import word_pattern

COND = "cond_stage_model."

# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_path():
    try:
        return default_vocab_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def tok(vocab_path) -> CLIPTokenizer:
    return CLIPTokenizer.from_file(vocab_path)


@pytest.fixture(scope="module")
def hf_tok(vocab_path):
    """transformers' CLIPTokenizer from vocab/merges objects built here, independently of ldmkit.

    transformers 5 ignores vocab_file=/merges_file=, so the dict and list are passed directly. The vocabulary
    is OpenAI's: 256 byte symbols in byte-map order, the same with "</w>", the first 48894 merges, 2 specials.
    """
    transformers = pytest.importorskip("transformers")
    visible = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_map = {b: chr(b) for b in visible}
    byte_map.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in visible)})
    with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
    symbols = list(byte_map.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges), vocab


def test_standard_ids(tok):
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    ids = tok("a photo of a cat", pad="eos")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == EOT_ID).all()
    zero = tok(["a photo of a cat", "dog"], pad="zero")
    assert zero.shape == (2, 77)
    assert zero[0, :7].tolist() == ids[0, :7].tolist() and (zero[0, 7:] == 0).all()
    assert zero[1, :3].tolist() == [SOT_ID, tok.encode("dog")[0], EOT_ID] and (zero[1, 3:] == 0).all()
    assert tok.vocab_size == 49408 and tok.decode(tok.encode("A photo of a CAT")) == "a photo of a cat"


def test_truncation_keeps_end_token(tok):
    text = " ".join(["photo"] * 100)
    full = [SOT_ID, *tok.encode(text), EOT_ID]
    assert len(full) == 102
    for pad in ("eos", "zero"):
        ids = tok(text, pad=pad)[0].tolist()
        assert ids == full[:76] + [EOT_ID]
    assert tok(text, context_length=10)[0].tolist() == full[:9] + [EOT_ID]
    exactly = " ".join(["photo"] * 75)  # 75 + start + end = 77: fits without truncation
    assert tok(exactly, truncate=False)[0, -1].item() == EOT_ID
    with pytest.raises(ValueError, match="more than context_length"):
        tok(text, truncate=False)
    with pytest.raises(ValueError, match="pad must be"):
        tok(text, pad="left")


def test_cleanup_html_whitespace_case(tok):
    assert tok.encode("fish &amp; chips") == tok.encode("fish & chips")
    assert tok.encode("fish &amp;amp; chips") == tok.encode("fish & chips")  # unescaped twice, as OpenAI
    assert tok.encode("  A\tPhoto \n\n of   A CAT ") == tok.encode("a photo of a cat")
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")  # NFC


PARITY_TEXTS = [
    "a photo of a cat",
    "A PHOTO of  a   Cat!!",
    "don't you're we've I'm they'll he'd it's",
    "DON'T SHOUT, it'S Rude",
    "Café crème brûlée à la française",
    "naïve façade Ελληνικά русский",
    "e\u0301 decomposed accents",
    "東京タワーの夜景",
    "mixed 中文 English 한국어 text",
    "🐱 cat emoji 😀🎉👩‍👩‍👧",
    "1234567890 3.14159 1,000,000 2nd 3rd",
    "hello...world?! (parens) [brackets] {braces}",
    "e-mail: foo@bar.com #hashtag $5 100% ~tilde~",
    "multiple     spaces\tand\nnewlines\r\nhere",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
    "Ünïcödé and ǅ titlecase İstanbul",
    "<|startoftext|> special <|endoftext|> tokens",
    "don’t curly apostrophe “quotes”",
    "a painting of a fox, trending on artstation, 4k, highly detailed, by greg rutkowski",
    "",
    "   ",
    "x" * 300,
    " ".join(["photo"] * 90),
]


@pytest.mark.parametrize("text", PARITY_TEXTS, ids=range(len(PARITY_TEXTS)))
def test_ids_match_transformers(tok, hf_tok, text):
    hf, _ = hf_tok
    expected = hf(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert tok(text, pad="eos").tolist() == expected.tolist()


def test_vocabulary_matches_independent_build(tok, hf_tok):
    _, vocab = hf_tok
    assert tok.encoder == vocab


def test_re_fallback_equals_regex_module(tok):
    """Without the ``regex`` module the pattern is built from ``unicodedata``; it must split identically."""
    regex = pytest.importorskip("regex")
    import unicodedata

    fast, fallback = word_pattern(True), word_pattern(False)
    assert isinstance(fast, regex.Pattern) and not isinstance(fallback, regex.Pattern)
    # Every code point both Unicode tables know, each on its own: its class must agree.
    chars = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    spaced = " ".join(chars)
    assert fallback.findall(spaced) == fast.findall(spaced)
    for text in ["don'T'S'ſ", "a\u0345b", "<|ſtartoftext|>x", "x\x1cy", *PARITY_TEXTS]:
        assert fallback.findall(text) == fast.findall(text), text


def test_missing_vocabulary_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
        CLIPTokenizer.from_file(tmp_path / VOCAB_FILE_NAME)
    with pytest.raises(FileNotFoundError, match=VOCAB_FILE_NAME.replace(".", r"\.")):
        default_vocab_path(package="no_such_package_xyz", distribution="no-such-distribution-xyz")
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
        CLIPTokenizer.from_file(bad)


def test_default_does_not_import_open_clip(vocab_path):
    imported_before = "open_clip" in sys.modules
    assert CLIPTokenizer.default().encode("cat") == [2368]
    assert ("open_clip" in sys.modules) == imported_before


# ----------------------------------------------------------------------------------------------------------
# Full-size key sets (meta device)
# ----------------------------------------------------------------------------------------------------------


def _cond_stage_keys(reference_dir, name: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    manifest = json.loads((reference_dir / "manifests" / f"{name}.json").read_text())
    keys = {k[len(COND) :]: v for k, v in manifest["keys"].items() if k.startswith(COND)}
    dtypes = {k[len(COND) :]: v for k, v in manifest["dtypes_non_float32"].items() if k.startswith(COND)}
    return keys, dtypes


@pytest.mark.reference  # reads tests/fixtures/reference (conftest.reference_dir)
@pytest.mark.parametrize(
    "name, build, n_keys",
    [("sd_v1", FrozenCLIPEmbedder, 197), ("sd_v2_v", lambda: FrozenOpenCLIPEmbedder(layer="penultimate"), 294)],
)
def test_full_size_keys_match_manifest(reference_dir, name, build, n_keys):
    expected, dtypes = _cond_stage_keys(reference_dir, name)
    with torch.device("meta"):
        embedder = build()
    state = embedder.state_dict()
    assert len(expected) == n_keys
    assert list(state) == list(expected)  # same keys, in the reference's order
    assert {k: list(v.shape) for k, v in state.items()} == expected
    assert {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if v.dtype != torch.float32} == dtypes
    # Strict loading of exactly the manifest's key set.
    as_dtype = {"int64": torch.long}
    loaded = {
        k: torch.empty(s, dtype=as_dtype.get(dtypes.get(k, ""), torch.float32), device="meta")
        for k, s in expected.items()
    }
    embedder.load_state_dict(loaded, strict=True)
    if name == "sd_v1":
        assert dtypes == {"transformer.text_model.embeddings.position_ids": "int64"}
        del loaded["transformer.text_model.embeddings.position_ids"]  # transformers >= 5 checkpoints lack it
        embedder.load_state_dict(loaded, strict=True)
    else:
        assert "model.attn_mask" not in state and dict(embedder.model.named_buffers())["attn_mask"].shape == (77, 77)


# ----------------------------------------------------------------------------------------------------------
# SD 1.x text model against transformers
# ----------------------------------------------------------------------------------------------------------

TINY_CLIP = CLIPTextConfig(vocab_size=49408, width=64, layers=3, heads=4, mlp_width=128, max_positions=77)


def _fill_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights: LayerNorm weights 1 + 0.05 N(0,1), everything else 0.05 N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(1 + noise if (p.ndim == 1 and name.endswith("weight")) else noise)


@pytest.fixture(scope="module")
def hf_clip():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=TINY_CLIP.vocab_size,
        hidden_size=TINY_CLIP.width,
        num_hidden_layers=TINY_CLIP.layers,
        num_attention_heads=TINY_CLIP.heads,
        intermediate_size=TINY_CLIP.mlp_width,
        max_position_embeddings=TINY_CLIP.max_positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    model = transformers.CLIPTextModel(config).eval()
    _fill_(model, seed=11)
    return model


def _tokens(seed: int = 5) -> torch.Tensor:
    """Two random prompts of 11 and 2 tokens, padded with the end token as SD 1.x feeds them."""
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[0, 12:], ids[1, 3:] = SOT_ID, EOT_ID, EOT_ID
    return ids


def test_clip_text_model_matches_transformers(hf_clip):
    ours = FrozenCLIPEmbedder(TINY_CLIP)
    # transformers 5 has no "text_model." level and no position_ids key: both handled by the documented mapping.
    hf_state = hf_clip.state_dict()
    assert "embeddings.position_ids" not in hf_state and not any(k.startswith("text_model.") for k in hf_state)
    ours.transformer.load_state_dict(clip_text_keys_from_transformers(hf_state), strict=True)
    ids = _tokens()
    with torch.no_grad():
        ref = hf_clip(input_ids=ids, output_hidden_states=True)
        text_model = ours.transformer.text_model
        assert len(ref.hidden_states) == TINY_CLIP.layers + 1
        torch.testing.assert_close(ours(ids), ref.last_hidden_state, atol=1e-5, rtol=0)
        for k in (0, 1, -2, -1):
            torch.testing.assert_close(
                text_model(ids, layer=k, final_norm=False), ref.hidden_states[k], atol=1e-5, rtol=0
            )
        clip_skip_2 = hf_clip.final_layer_norm(ref.hidden_states[-2])
        torch.testing.assert_close(text_model(ids, layer=-2), clip_skip_2, atol=1e-5, rtol=0)
        hidden = FrozenCLIPEmbedder(TINY_CLIP, layer="hidden", layer_idx=-2)
        hidden.load_state_dict(ours.state_dict())
        torch.testing.assert_close(hidden(ids), ref.hidden_states[-2], atol=1e-5, rtol=0)
        pooled = FrozenCLIPEmbedder(TINY_CLIP, layer="pooled")
        pooled.load_state_dict(ours.state_dict())
        torch.testing.assert_close(pooled(ids), ref.pooler_output[:, None], atol=1e-5, rtol=0)


def test_clip_position_ids_filled_and_repaired():
    model = CLIPTextModel(TINY_CLIP)
    state = model.state_dict()
    arange = torch.arange(77)[None]
    model.text_model.embeddings.position_ids.zero_()
    missing = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    model.load_state_dict(missing, strict=True)
    assert torch.equal(model.text_model.embeddings.position_ids, arange)
    assert "text_model.embeddings.position_ids" not in missing  # the caller's dict is left alone
    model.text_model.embeddings.position_ids.zero_()
    drifted = dict(state, **{"text_model.embeddings.position_ids": arange.float() - 1e-4})  # 76.9999, 75.9999, ...
    model.load_state_dict(drifted, strict=True)
    assert torch.equal(model.text_model.embeddings.position_ids, arange)
    assert model.text_model.embeddings.position_ids.dtype == torch.long
    # transformers 4.x keys already carry "text_model." and pass through unchanged.
    assert clip_text_keys_from_transformers(state).keys() == state.keys()


def test_clip_text_model_is_causal_and_validates():
    model = CLIPTextTransformer(TINY_CLIP).eval()
    _fill_(model, seed=3)
    ids = _tokens()
    changed = ids.clone()
    changed[:, 6] = 1234
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="layer must be"):
        model(ids, layer=TINY_CLIP.layers + 1)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(TINY_CLIP, layer="hidden")
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenCLIPEmbedder(TINY_CLIP, layer="penultimate")
    assert not any(p.requires_grad for p in FrozenCLIPEmbedder(TINY_CLIP).parameters())
    assert all(p.requires_grad for p in FrozenCLIPEmbedder(TINY_CLIP, freeze=False).parameters())


def test_clip_encode_uses_eos_padding(tok):
    embedder = FrozenCLIPEmbedder(TINY_CLIP)
    _fill_(embedder, seed=4)
    with torch.no_grad():
        z = embedder.encode(["a photo of a cat"], tok)
        assert z.shape == (1, 77, 64)
        torch.testing.assert_close(z, embedder(tok("a photo of a cat", pad="eos")), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# SD 2.x OpenCLIP tower against attention written out by hand
# ----------------------------------------------------------------------------------------------------------

TINY_OPENCLIP = OpenCLIPTextConfig(vocab_size=49408, width=32, heads=4, layers=3, context_length=77, embed_dim=16)


def _open_clip_by_hand(model, tokens: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """open_clip's text forward for the first ``n_blocks`` blocks, then ln_final, from the raw parameters."""
    c, heads = TINY_OPENCLIP.width, TINY_OPENCLIP.heads
    d = c // heads
    n = tokens.shape[1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    x = model.token_embedding.weight[tokens] + model.positional_embedding[:n]
    for blk in list(model.transformer.resblocks)[:n_blocks]:
        h = F.layer_norm(x, (c,), blk.ln_1.weight, blk.ln_1.bias, 1e-5)
        q, k, v = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).split(c, dim=-1)
        q, k, v = (t.reshape(t.shape[0], n, heads, d).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
        att = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + att @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        h = F.layer_norm(x, (c,), blk.ln_2.weight, blk.ln_2.bias, 1e-5)
        h = h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    return F.layer_norm(x, (c,), model.ln_final.weight, model.ln_final.bias, 1e-5)


def test_open_clip_tower_matches_manual_math():
    last = FrozenOpenCLIPEmbedder(TINY_OPENCLIP, layer="last")
    _fill_(last, seed=7)
    penultimate = FrozenOpenCLIPEmbedder(TINY_OPENCLIP, layer="penultimate")
    penultimate.load_state_dict(last.state_dict(), strict=True)
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(9))
    ids[:, 0], ids[:, 20], ids[:, 21:] = SOT_ID, EOT_ID, 0
    with torch.no_grad():
        z_last, z_pen = last(ids), penultimate(ids)
        assert z_last.shape == z_pen.shape == (2, 77, 32)
        torch.testing.assert_close(z_last, _open_clip_by_hand(last.model, ids, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(z_pen, _open_clip_by_hand(last.model, ids, 2), atol=1e-5, rtol=0)
        assert (z_last - z_pen).abs().amax() > 1e-2
        # Causal: a change at position 8 leaves positions 0..7 alone.
        changed = ids.clone()
        changed[:, 8] = 4321
        z_changed = last(changed)
    torch.testing.assert_close(z_changed[:, :8], z_last[:, :8], atol=1e-6, rtol=0)
    assert (z_changed[:, 8:] - z_last[:, 8:]).abs().amax() > 1e-3


def test_open_clip_encode_and_validation(tok):
    embedder = FrozenOpenCLIPEmbedder(TINY_OPENCLIP, layer="penultimate")
    _fill_(embedder, seed=8)
    with torch.no_grad():
        z = embedder.encode("a photo of a cat", tok)
        torch.testing.assert_close(z, embedder(tok("a photo of a cat", pad="zero")), atol=0, rtol=0)
    assert z.shape == (1, 77, 32)
    assert not any(p.requires_grad for p in embedder.parameters())
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenOpenCLIPEmbedder(TINY_OPENCLIP, layer="pooled")
    with pytest.raises(ValueError, match="tokens must have shape"):
        embedder(torch.zeros(1, 78, dtype=torch.long))
