"""CUDA-graph replay of the UNet (nn.cuda_graph, Pipeline.enable_cuda_graphs).

On this CPU the tests check what decides whether a graph is used: the call's signature, the eager fallback
(autograd on, CPU inputs), the denoiser's routing, and the clear error of the switch without a CUDA device.
The CUDA tests (skipped here, run on a GPU machine: `pytest tests/test_cuda_graphs.py`) check that replayed
outputs equal eager ones, that each new shape captures its own graph, and that moved or rewritten weights are
followed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ldmkit.ldm.conditioned_unet import ConditionedUNet
from ldmkit.models.unet import UNetConfig, UNetModel
from ldmkit.nn.cuda_graph import CUDAGraphRunner, _flatten

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Full fp32 matmuls and convolutions for one test (replay vs eager at 1e-5), the previous flags back after."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _pipeline():
    """The mnist_tiny model with seeded random weights (no data needed, so it also runs on a bare GPU machine)."""
    from ldmkit.config import load_config
    from ldmkit.ldm.build import LDMParts, build_autoencoder, build_conditioner, build_schedule, build_unet
    from ldmkit.pipeline import LatentDiffusionPipeline

    cfg = load_config("mnist_tiny")
    torch.manual_seed(0)
    parts = LDMParts(build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg), build_schedule(cfg))
    with torch.no_grad():
        for p in parts.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return LatentDiffusionPipeline(cfg, parts, 1.0)


def _unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    model = UNetModel(UNetConfig(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                                 attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=2,
                                 use_spatial_transformer=True, context_dim=16, legacy=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised output layers: fill them so outputs are not trivially zero
                p.normal_(0, 0.05)
    return model


def _inputs(batch: int = 2, size: int = 8, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + size)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, 3, 16, generator=g)
    return x.to(device), t.to(device), ctx.to(device)


def test_signature_separates_shapes_dtypes_and_values() -> None:
    x, t, ctx = _inputs()
    tensors, key = _flatten((x, t), {"context": ctx})
    assert [a is b for a, b in zip(tensors, (x, t, ctx), strict=True)] == [True, True, True]
    assert _flatten((x, t), {"context": ctx.clone()})[1] == key  # same shapes: the same graph
    assert _flatten((x[:1], t[:1]), {"context": ctx[:1]})[1] != key
    assert _flatten((x.double(), t), {"context": ctx})[1] != key
    assert _flatten((x, t), {"context": None})[1] != key
    assert _flatten((x, 500), {"context": ctx})[1] != _flatten((x, 400), {"context": ctx})[1]  # baked-in number
    assert _flatten((x, t), {"context": [ctx, ctx]})[1] != key
    assert _flatten((x, object()), {}) is None  # an argument it cannot key: the call runs eagerly


def test_cpu_calls_and_autograd_run_eagerly() -> None:
    unet = _unet()
    runner = CUDAGraphRunner(unet)
    x, t, ctx = _inputs()
    with torch.inference_mode():
        assert torch.equal(runner(x, t, context=ctx), unet(x, t, context=ctx))
    out = runner(x, t, context=ctx)  # autograd on: eager, differentiable
    out.square().mean().backward()
    assert unet.out[-1].weight.grad is not None
    assert runner.captures == 0 and not runner.graphs
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphRunner(unet, max_graphs=0)


def test_denoiser_routes_inference_through_the_runner_only() -> None:
    unet = _unet()
    den = ConditionedUNet(unet, None, "crossattn").eval()
    calls = []

    def runner(*args, **kwargs):  # the real UNet, counted
        calls.append(torch.is_grad_enabled())
        return unet(*args, **kwargs)

    den.unet_runner = runner
    x, t, ctx = _inputs()
    with torch.no_grad():
        a = den(x, t, context=ctx)
    b = den(x, t, context=ctx)  # training-style call: the module itself, never a graph
    assert calls == [False]
    assert torch.equal(a, b.detach())
    assert "unet_runner" not in "".join(den.state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_pipeline_switch_needs_cuda() -> None:
    pipe = _pipeline()
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        pipe.enable_cuda_graphs()
    assert pipe.enable_cuda_graphs(False).net.unet_runner is None


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replay_equals_eager_and_captures_once_per_shape(dtype: torch.dtype, no_tf32: None) -> None:
    unet = _unet().cuda().to(dtype)
    runner = CUDAGraphRunner(unet)
    with torch.inference_mode():
        for batch, size in ((2, 8), (2, 8), (4, 8), (2, 16), (2, 8)):
            x, t, ctx = _inputs(batch, size, "cuda")
            x, ctx = x.to(dtype), ctx.to(dtype)
            got, want = runner(x, t, context=ctx), unet(x, t, context=ctx)
            assert got.shape == want.shape
            fp32 = dtype == torch.float32  # the same kernels replayed: equal up to any algorithm cuDNN picks anew
            torch.testing.assert_close(got, want, rtol=1e-5 if fp32 else 1e-3, atol=1e-5 if fp32 else 2e-3)
    assert runner.captures == 3 and len(runner.graphs) == 3


@cuda
def test_weights_moved_or_rewritten_are_followed() -> None:
    unet = _unet().cuda()
    runner = CUDAGraphRunner(unet)
    x, t, ctx = _inputs(2, 8, "cuda")
    with torch.inference_mode():
        first = runner(x, t, context=ctx)
        other = _unet(seed=1).cuda()
        unet.load_state_dict(other.state_dict())  # in place: the graph reads the new values
        torch.testing.assert_close(runner(x, t, context=ctx), other(x, t, context=ctx), rtol=1e-5, atol=1e-4)
        assert runner.captures == 1
        unet.to(memory_format=torch.channels_last)  # new weight tensors: recaptured
        torch.testing.assert_close(runner(x, t, context=ctx), other(x, t, context=ctx), rtol=1e-5, atol=1e-4)
        assert runner.captures == 2
        assert (first - other(x, t, context=ctx)).abs().max() > 1e-2  # the new weights did change the output


@cuda
def test_pipeline_samples_the_same_with_graphs(no_tf32: None) -> None:
    pipe = _pipeline().to("cuda")
    eager = pipe.sample(return_latents=True, class_label=[1, 2, 3], steps=10, guidance=2.0, seed=4)
    pipe.enable_cuda_graphs()
    graphed = pipe.sample(return_latents=True, class_label=[1, 2, 3], steps=10, guidance=2.0, seed=4)
    assert pipe.net.unet_runner.captures == 1  # one shape: cond and uncond batched together, every step
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-4)
    pipe.fuse_qkv_projections()  # a switch that changes the computation drops the graphs
    assert not pipe.net.unet_runner.graphs
    again = pipe.sample(return_latents=True, class_label=[1, 2, 3], steps=10, guidance=2.0, seed=4)
    torch.testing.assert_close(again, eager, rtol=1e-4,
                               atol=1e-3)  # fused projections: other float rounding
    assert pipe.net.unet_runner.captures == 2
