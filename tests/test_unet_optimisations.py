"""The UNet's inference options give the outputs of the plain model: fused QKV projections (and a cached fused
weight that never goes stale), attention slicing, channels_last, torch.compile.

Tiny seeded UNets whose zero-initialised output layers are filled too, so that outputs are not trivially zero.
Speed and memory of the same options are measured by benchmarks/unet_options.py, not asserted here; its --quick
form runs at the end.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.models.unet import UNetConfig, UNetModel
from ldmkit.nn.attention import CrossAttention, SpatialTransformer, sliced_attention

BENCH_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "unet_options.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _unet(seed: int = 0, **overrides) -> UNetModel:
    kwargs = dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                  attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=2, use_spatial_transformer=True,
                  context_dim=16, legacy=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = UNetModel(UNetConfig(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised output convs / proj_out
                p.normal_(0, 0.05)
    return model


def _adm_unet(new_order: bool) -> UNetModel:
    return _unet(use_spatial_transformer=False, context_dim=None, num_heads=-1, num_head_channels=8, legacy=True,
                 use_new_attention_order=new_order)


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 900][:batch])
    context = torch.randn(batch, 5, 16, generator=g)
    return x, t, context


def _attention(seed: int = 0) -> CrossAttention:
    torch.manual_seed(seed)
    return CrossAttention(24, heads=3, dim_head=8).eval()


# ----------------------------------------------------------------------------------------------------------
# Fused QKV projections.


def test_fused_qkv_matches_unfused_and_keeps_checkpoint_keys() -> None:
    model = _unet()
    x, t, context = _inputs()
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x, t, context)
        assert model.fuse_qkv_projections() == 7  # one self-attention per SpatialTransformer
        fused = model(x, t, context)
    assert ref.std() > 0.1
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=0)
    assert list(model.state_dict()) == keys  # no to_qkv key, no cache in the state_dict
    model.load_state_dict(_unet(seed=1).state_dict(), strict=True)
    fused_layers = [m for m in model.modules() if isinstance(m, CrossAttention) and m.fuse_qkv]
    assert len(fused_layers) == 7 and all(m._qkv_cache is not None for m in fused_layers)
    model.unfuse_qkv_projections()
    assert not any(isinstance(m, CrossAttention) and (m.fuse_qkv or m._qkv_cache) for m in model.modules())


def test_fused_qkv_skips_layers_that_attend_to_the_context() -> None:
    model = _unet(disable_self_attentions=(True, False))
    assert model.fuse_qkv_projections() == 4  # the three level-0 blocks read k, v from the context
    x, t, context = _inputs()
    with torch.no_grad():
        fused = model(x, t, context)
        model.unfuse_qkv_projections()
        torch.testing.assert_close(fused, model(x, t, context), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change", ["load_state_dict", "assign", "in_place", "to_float64", "deepcopy"])
def test_fused_weight_follows_weight_changes(change: str) -> None:
    """Every way a weight can change after the fused weight was cached gives the unfused result."""
    attn = _attention()
    attn.fuse_qkv = True
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attn(x)  # caches the fused weight
    assert attn._qkv_cache is not None
    other = _attention(seed=1).state_dict()
    if change == "load_state_dict":
        attn.load_state_dict(other)
    elif change == "assign":
        attn.load_state_dict(other, assign=True)
    elif change == "in_place":
        with torch.no_grad():
            attn.to_k.weight.mul_(-2.0)
    elif change == "to_float64":
        attn, x = attn.to(torch.float64), x.double()
    else:
        attn = copy.deepcopy(attn)
        with torch.no_grad():
            attn.to_v.weight.add_(1.0)
    with torch.no_grad():
        fused = attn(x)
        attn.fuse_qkv = False
        torch.testing.assert_close(fused, attn(x), atol=1e-6, rtol=0)


def test_fused_qkv_trains_like_unfused() -> None:
    """With grad on, the fused path is differentiable (gradients reach to_q/to_k/to_v) and an optimizer step is
    seen by the next no-grad call."""
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(2))
    grads = []
    for fuse in (False, True):
        attn = _attention().train()
        attn.fuse_qkv = fuse
        with torch.no_grad():
            attn(x)  # a cache from an earlier no-grad call must not be used by training
        attn(x).square().mean().backward()
        grads.append([attn.get_parameter(f"{n}.weight").grad.clone() for n in ("to_q", "to_k", "to_v")])
        torch.optim.SGD(attn.parameters(), lr=0.5).step()
        with torch.no_grad():
            stepped = attn(x)
            attn.fuse_qkv = False
            torch.testing.assert_close(stepped, attn(x), atol=1e-6, rtol=0)
    for unfused, fused in zip(*grads, strict=True):
        torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=0)


def test_fused_qkv_under_inference_mode() -> None:
    attn = _attention()
    attn.fuse_qkv = True
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = attn(x)
    # The weight cached under inference_mode is a normal tensor: a frozen model can still be differentiated
    # with respect to its input (as guidance by gradients does).
    attn.requires_grad_(False)
    x_grad = x.clone().requires_grad_(True)
    attn(x_grad).sum().backward()
    assert x_grad.grad is not None
    # Weights created under inference_mode have no version counter: nothing is cached, results stay right.
    with torch.inference_mode():
        frozen = _attention()
        frozen.fuse_qkv = True
        assert frozen.to_q.weight.is_inference()
        frozen(x)
        frozen.to_q.weight.mul_(0.5)
        fused = frozen(x)
        frozen.fuse_qkv = False
        torch.testing.assert_close(fused, frozen(x), atol=1e-6, rtol=0)
        assert not torch.equal(fused, ref)


# ----------------------------------------------------------------------------------------------------------
# Attention slicing.


@pytest.mark.parametrize("slice_size", [1, 3, 4, 5])  # 2 heads x batch 3: per head, whole batch elements, odd
def test_attention_slicing_matches(slice_size: int) -> None:
    model = _unet()
    x, t, context = _inputs(batch=3)
    with torch.no_grad():
        ref = model(x, t, context)
        model.set_attention_slice(slice_size)
        torch.testing.assert_close(model(x, t, context), ref, atol=1e-6, rtol=0)
        model.fuse_qkv_projections()  # both options together
        torch.testing.assert_close(model(x, t, context), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_slicing_adm_attention_block(new_order: bool) -> None:
    model = _adm_unet(new_order)
    x, t, _ = _inputs()
    with torch.no_grad():
        ref = model(x, t)
        model.set_attention_slice(3)
        sliced = model(x, t)
    assert ref.std() > 0.1
    torch.testing.assert_close(sliced, ref, atol=1e-6, rtol=0)


def test_sliced_attention_with_mask_and_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g, requires_grad=True) for n in (10, 7, 7))
    mask = torch.rand(3, 1, 1, 7, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for slice_size in (1, 3, 8, 100):
        out = sliced_attention(q, k, v, mask, slice_size)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        for got, want in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), ref_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "auto"])
def test_set_attention_slice_rejects_bad_sizes(bad) -> None:
    with pytest.raises(ValueError, match="slice_size"):
        _unet().set_attention_slice(bad)


# ----------------------------------------------------------------------------------------------------------
# channels_last and torch.compile.


def test_channels_last_matches_and_keeps_the_layout() -> None:
    model = _unet()
    x, t, context = _inputs()
    with torch.no_grad():
        ref = model(x, t, context)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        layouts = []
        for module in model_cl.modules():
            if isinstance(module, SpatialTransformer):
                module.proj_out.register_forward_pre_hook(
                    lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
                )
        out = model_cl(x.to(memory_format=torch.channels_last), t, context)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # The transformer hands its tokens back as a channels_last view instead of copying to NCHW and back.
    assert layouts == [True] * 7


def test_torch_compile_matches_eager() -> None:
    """Inductor on CPU (g++), fused QKV on, in one graph: the fused weight's cache must not break the trace.

    The smallest UNet with every block kind (ResBlock, SpatialTransformer, skip concat), since a cold compile
    costs about 2 s of g++ per generated kernel.
    """
    model = _unet(channel_mult=(1,), attention_resolutions=(1,))
    x, t, context = _inputs()
    with torch.no_grad():
        ref = model(x, t, context)
        model.fuse_qkv_projections()
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        try:
            out = compiled(x, t, context)
        finally:
            torch._dynamo.reset()
    assert ref.std() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# The benchmark (benchmarks/unet_options.py) in its --quick form.


def test_unet_options_benchmark_quick(capsys) -> None:
    spec = importlib.util.spec_from_file_location("ldmkit_benchmark_unet_options", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        assert module.main(["--quick", "--rounds", "1"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = table[1:]  # the header first
    assert len(rows) == 9  # every option of --quick, the baselines included
    diffs = [float(r[4].rstrip(" |")) for r in rows if r[4].rstrip(" |") != "-"]
    assert len(diffs) == 7 and max(diffs) < 1e-4  # every option computes the baseline's output
    assert all(r[3] != "-" for r in rows)  # peak memory measured for each (Linux /proc)
