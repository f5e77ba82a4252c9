"""transformers ``CLIPTextModel`` + ``CLIPTokenizer`` export of Stable Diffusion's text conditioners.

SD 1.x's ``FrozenCLIPEmbedder`` is a rename, SD 2.x's ``FrozenOpenCLIPEmbedder`` has its fused q/k/v split in
three; the tokenizer files are built from OpenAI's BPE vocabulary. Nothing here imports transformers except to
double-check the layout when it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .diffusers_unet import _compare_states

__all__ = ["text_encoder_to_diffusers", "tokenizer_files"]

_FALLBACK_TRANSFORMERS_VERSION = "4.40.0"


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:
        return _FALLBACK_TRANSFORMERS_VERSION


# ----------------------------------------------------------------------------------------------------------
# Text encoder


def _clip_text_config(
    *, vocab: int, width: int, layers: int, heads: int, mlp: int, positions: int, act: str, eps: float, proj: int
) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": mlp,
        "projection_dim": proj,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": positions,
        "hidden_act": act,
        "layer_norm_eps": eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": 49406,
        "eos_token_id": 49407,  # not the legacy 2: pooler_output then finds the first end-of-text token
        "pad_token_id": 1,
        "torch_dtype": "float32",
        "transformers_version": _transformers_version(),
    }


def _clip_text_layout(config: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Key ``state`` (names without ``text_model.``) in the transformers 4.x ``CLIPTextModel`` layout.

    transformers 4.x names the weights ``text_model.<name>``; transformers 5 names them ``<name>`` and strips a
    ``text_model.`` prefix when loading, so the 4.x layout, written whatever version is installed, loads in both.
    When transformers is installed, its ``CLIPTextModel`` is built on the meta device and its key set and shapes
    are checked against the export (the prefix added to its keys where that version does not have it).
    """
    prefixed = {"text_model." + k: v for k, v in state.items()}
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        return prefixed
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**kwargs))
    expected = {
        k if k.startswith("text_model.") else "text_model." + k: v
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }
    _compare_states("transformers CLIPTextModel", expected, prefixed)
    return prefixed


def _check_position_ids(ids: Tensor, n: int) -> None:
    if ids.is_meta:  # shapes-only model (e.g. built on the meta device to check a layout)
        return
    if not torch.equal(ids.reshape(-1).round().long(), torch.arange(n)):
        raise ValueError("the CLIP text model's position_ids are not 0..N-1; the export would change its output")


def text_encoder_to_diffusers(conditioner: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Tensor], str]:
    """(transformers ``CLIPTextModel`` config.json, its state dict, pad token) for an SD text conditioner.

    ``FrozenCLIPEmbedder`` (SD 1.x, layer "last") is a rename; ``FrozenOpenCLIPEmbedder`` (SD 2.x) has its fused
    q/k/v split and, for layer "penultimate", its last block dropped: diffusers' pipelines read
    ``last_hidden_state`` (final LayerNorm included), which is then exactly what SD 2.x conditions on.
    """
    from ..models.text_clip import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

    state = conditioner.state_dict()
    out: dict[str, Tensor] = {}
    if isinstance(conditioner, FrozenCLIPEmbedder):
        if conditioner.layer != "last":
            raise ValueError(
                f"the CLIP text encoder reads layer {conditioner.layer!r}; diffusers' pipelines use the last hidden "
                "state (layer 'last'), so this model cannot be exported as a text_encoder"
            )
        tc = conditioner.transformer.text_model.config
        prefix = "transformer.text_model."
        for key, value in state.items():
            if not key.startswith(prefix):
                raise ValueError(f"unexpected CLIP text encoder key {key}")
            name = key[len(prefix) :]
            if name == "embeddings.position_ids":
                _check_position_ids(value, tc.max_positions)
                continue
            out[name] = value
        config = _clip_text_config(vocab=tc.vocab_size, width=tc.width, layers=tc.layers, heads=tc.heads,
                                   mlp=tc.mlp_width, positions=tc.max_positions, act=tc.act, eps=tc.eps, proj=tc.width)
        return config, _clip_text_layout(config, out), "<|endoftext|>"
    if isinstance(conditioner, FrozenOpenCLIPEmbedder):
        oc = conditioner.model.config
        keep = oc.layers - conditioner.layer_idx  # blocks whose output SD reads (23 of 24 for "penultimate")
        used: set[str] = set()

        def take(key: str) -> Tensor:
            used.add(key)
            return state[key]

        out["embeddings.token_embedding.weight"] = take("model.token_embedding.weight")
        out["embeddings.position_embedding.weight"] = take("model.positional_embedding")
        out["final_layer_norm.weight"] = take("model.ln_final.weight")
        out["final_layer_norm.bias"] = take("model.ln_final.bias")
        for i in range(oc.layers):
            src, dst = f"model.transformer.resblocks.{i}.", f"encoder.layers.{i}."
            names = [k for k in state if k.startswith(src)]
            if i >= keep:
                used.update(names)  # dropped: SD never reads these blocks
                continue
            for w in ("weight", "bias"):
                q, k, v = take(f"{src}attn.in_proj_{w}").chunk(3, dim=0)
                out[f"{dst}self_attn.q_proj.{w}"] = q
                out[f"{dst}self_attn.k_proj.{w}"] = k
                out[f"{dst}self_attn.v_proj.{w}"] = v
                out[f"{dst}self_attn.out_proj.{w}"] = take(f"{src}attn.out_proj.{w}")
                out[f"{dst}layer_norm1.{w}"] = take(f"{src}ln_1.{w}")
                out[f"{dst}layer_norm2.{w}"] = take(f"{src}ln_2.{w}")
                out[f"{dst}mlp.fc1.{w}"] = take(f"{src}mlp.c_fc.{w}")
                out[f"{dst}mlp.fc2.{w}"] = take(f"{src}mlp.c_proj.{w}")
        used.update(k for k in ("model.text_projection", "model.logit_scale") if k in state)  # CLIP-only heads
        leftovers = sorted(set(state) - used)
        if leftovers:
            raise ValueError(f"OpenCLIP text encoder keys with no transformers equivalent: {leftovers[:3]}")
        config = _clip_text_config(vocab=oc.vocab_size, width=oc.width, layers=keep, heads=oc.heads,
                                   mlp=oc.mlp_width, positions=oc.context_length, act=oc.act, eps=oc.eps,
                                   proj=oc.embed_dim)
        return config, _clip_text_layout(config, out), "!"
    raise ValueError(f"no transformers text encoder for a {type(conditioner).__name__} conditioner")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_files(pad_token: str, *, bpe_vocab: str | Path | None = None, max_length: int = 77) -> dict[str, str]:
    """The files of a transformers ``CLIPTokenizer`` folder (name -> text), built from OpenAI's BPE vocabulary.

    ``pad_token`` is "<|endoftext|>" for SD 1.x and "!" (id 0, OpenCLIP's zero padding) for SD 2.x.
    ``bpe_vocab`` is ``bpe_simple_vocab_16e6.txt.gz`` (default: the copy in the installed open-clip-torch).
    """
    from ..text.clip_bpe import END_OF_TEXT, START_OF_TEXT, CLIPTokenizer

    tok = CLIPTokenizer.default() if bpe_vocab is None else CLIPTokenizer.from_file(bpe_vocab)
    if pad_token not in tok.encoder:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    special = {"bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "pad_token": pad_token}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    return {
        "vocab.json": json.dumps(tok.encoder, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in tok.merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
