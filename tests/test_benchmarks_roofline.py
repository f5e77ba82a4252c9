"""Smoke tests of benchmarks/roofline.py and benchmarks/sd_sampling_memory.py: the FLOP counting they rest on
(closed forms for convolutions, linears and CPU flash attention), and each script's --quick table."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"ldmkit_benchmark_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def roofline():
    module = _load("roofline")
    yield module
    sys.modules.pop(module.__name__, None)


@pytest.fixture(scope="module")
def sampling():
    module = _load("sd_sampling_memory")
    yield module
    sys.modules.pop(module.__name__, None)


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells) of the markdown table whose header line starts with `header_start`."""
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[i + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def test_conv_and_linear_flops_match_closed_form(roofline):
    b, h, w = 2, 12, 10
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 5, padding=2), nn.Conv2d(6, 4, 1))
    x = torch.randn(b, 3, h, w)
    with torch.inference_mode():
        total, per_op = roofline.count_flops(lambda: net(x))
    expected = sum(2 * cin * cout * k * k * h * w * b for cin, cout, k in ((3, 8, 3), (8, 6, 5), (6, 4, 1)))
    assert total == expected
    assert set(per_op) == {"aten.convolution"}
    assert roofline.flop_shares(per_op)["conv"] == 1.0

    lin = nn.Linear(16, 24)
    z = torch.randn(5, 7, 16)
    total, per_op = roofline.count_flops(lambda: lin(z))
    assert total == 2 * 5 * 7 * 16 * 24
    assert roofline.flop_shares(per_op)["matmul"] == 1.0


def test_cpu_flash_attention_is_counted(roofline):
    # torch's registry lacks the CPU flash kernel: the script adds it, with 4 * B * H * Lq * Lk * D
    b, heads, lq, lk, d = 2, 3, 40, 24, 8
    q, k, v = torch.randn(b, heads, lq, d), torch.randn(b, heads, lk, d), torch.randn(b, heads, lk, d)
    total, per_op = roofline.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert total == 4 * b * heads * lq * lk * d
    assert roofline.flop_shares(per_op)["attention"] == 1.0


def test_unet_count_on_cpu_equals_math_attention_on_meta(roofline):
    """The CPU count (fused attention kernel) equals the meta-device count, where SDPA decomposes into bmm."""
    from ldmkit.config import load_config
    from ldmkit.ldm.build import build_unet

    cfg = load_config("sd-v1")
    cfg.unet.model_channels, cfg.unet.num_heads = 32, 2
    counts = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            torch.manual_seed(0)
            unet = build_unet(cfg).eval()
            x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 768), torch.full((2,), 500)
        with torch.inference_mode():
            counts[device] = roofline.count_flops(lambda unet=unet, x=x, ctx=ctx, t=t: unet(x, t, context=ctx))
    (cpu_total, cpu_ops), (meta_total, meta_ops) = counts["cpu"], counts["meta"]
    assert cpu_total == meta_total > 0
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in cpu_ops and "aten.bmm" in meta_ops
    shares = roofline.flop_shares(cpu_ops)
    assert shares["conv"] > 0.1 and shares["matmul"] > 0.1 and shares["attention"] > 0.01
    assert abs(sum(shares.values()) - 1) < 1e-12


def test_roofline_quick_table(roofline, capsys):
    assert roofline.main(["--quick", "--threads", "1", "--no-diffusers", "--kernel-repeats", "1"]) == 0
    out = capsys.readouterr().out
    kernels = _table_rows(out, "| kernel |")
    names = [r[0] for r in kernels]
    assert names[0].startswith("sgemm 256 x 256 x 256")
    assert any(n.startswith("conv 3x3") and "channels_last" in n for n in names)
    assert any(n.startswith("linear") for n in names) and any(n.startswith("SDPA") for n in names)
    assert kernels[0][-1] == "100 %"

    (row,) = _table_rows(out, "| model |")
    assert row[0] == "sd-v1 @ 64 ch, 1 heads, 2 x 4 x 16 x 16"
    assert row[3] == "-" and row[6] == "-"  # no diffusers columns with --no-diffusers
    gflops, seconds, rate = float(row[1]), float(row[2]), float(row[4])
    assert rate == pytest.approx(gflops / seconds, rel=0.02, abs=0.1)

    # the same UNet counted independently on the meta device (math attention: bmm)
    from ldmkit.config import load_config
    from ldmkit.ldm.build import build_unet

    cfg = load_config("sd-v1")
    cfg.unet.model_channels, cfg.unet.num_heads = 64, 1
    with torch.device("meta"):
        unet = build_unet(cfg).eval()
        x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 768), torch.full((2,), 500)
    total, _ = roofline.count_flops(lambda: unet(x, t, context=ctx))
    assert gflops == pytest.approx(total / 1e9, abs=0.006)

    (shares,) = _table_rows(out, "| model | conv |")
    pct = [float(c.rstrip(" %")) for c in shares[1:4]]
    assert 98 <= sum(pct) <= 102 and all(p > 0 for p in pct)
    assert re.search(r"goal >= 60 % of the matmul peak for sd-v1 @ 64 ch.*: ldmkit reaches \d+ %, (met|not met)", out)


def test_sampling_memory_quick_table(sampling, capsys):
    assert sampling.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out, "| phase |")
    phases = [r[0] for r in rows]
    assert phases[0].startswith("process start")
    assert phases[1] == "weights built with seeded random init"
    assert phases[2].startswith("text encoder ran (2 calls")
    assert phases[3:5] == ["after UNet step 1 of 2 (CFG batch 2)", "after UNet step 2 of 2 (CFG batch 2)"]
    assert phases[5] == "after VAE decode to 1 x 3 x 64 x 64 (whole job)"
    peaks = [float(r[1]) for r in rows]
    assert peaks == sorted(peaks) and 0.05 < peaks[-1] < 2.0  # a high-water mark never falls
    assert all(float(r[2]) <= float(r[1]) + 1e-9 for r in rows)  # current RSS <= peak so far
    whole = float(re.search(r"peak of the whole job: ([\d.]+) GiB", out).group(1))
    assert whole == pytest.approx(peaks[-1], abs=0.006) and "goal <= 5 GiB: holds" in out
    assert "all finite: True" in out


def test_sampling_memory_rejects_bad_options(sampling):
    with pytest.raises(ValueError, match="--load checkpoint"):
        sampling.main(["--quick", "--load", "checkpoint"])
    with pytest.raises(ValueError, match="--size"):
        sampling.main(["--quick", "--size", "60"])
    with pytest.raises(ValueError, match="--vae-tile-overlap"):
        sampling.main(["--quick", "--vae-tile", "4", "--vae-tile-overlap", "4"])
