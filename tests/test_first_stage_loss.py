"""Stage-1 losses: reference key sets, LPIPS file loading, GAN schedule, adaptive weight, d-losses."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldmkit.models.discriminator import NLayerDiscriminator, weights_init
from ldmkit.models.distributions import DiagonalGaussianDistribution
from ldmkit.models.first_stage_loss import (
    LPIPSWithDiscriminator,
    PerceptualLossDisabledWarning,
    VQLPIPSWithDiscriminator,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldmkit.models.perceptual import LPIPS, LPIPSWeightsError, vgg16_conv_indices

pytestmark = pytest.mark.reference  # reads tests/fixtures/reference (conftest.reference_dir)


def _manifest(reference_dir, name):
    return json.loads((reference_dir / "manifests" / f"{name}.json").read_text())


def _loss_params(manifest):
    return dict(manifest["config"]["params"]["lossconfig"]["params"])


# --- random weights in the two user-file formats ------------------------------------------------------


def _random_vgg16_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """torchvision layout (features.{i}.*, plus a classifier key that must be ignored); He-scaled weights."""
    sd, c_in = {}, 3
    for i in vgg16_conv_indices():
        c_out = {0: 64, 2: 64, 5: 128, 7: 128}.get(i, 256 if i < 17 else 512)
        sd[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * math.sqrt(2 / (9 * c_in))
        sd[f"features.{i}.bias"] = torch.randn(c_out, generator=gen) * 0.01
        c_in = c_out
    sd["classifier.6.bias"] = torch.zeros(1000)
    return sd


def _random_lin_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """lpips package layout; non-negative weights like the real ones, so distances are >= 0."""
    return {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) * 0.1
        for i, c in enumerate((64, 128, 256, 512, 512))
    }


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    gen = torch.Generator().manual_seed(0)
    vgg, lin = _random_vgg16_state(gen), _random_lin_state(gen)
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "vgg.pth")
    return d / "vgg16.pth", d / "vgg.pth", vgg, lin


@pytest.fixture(scope="module")
def lpips_loaded(lpips_files):
    return LPIPS.from_files(lpips_files[0], lpips_files[1])


# --- key sets against the reference manifests -------------------------------------------------------


def test_kl_loss_keys_match_manifest(reference_dir):
    m = _manifest(reference_dir, "first_stage_kl_f8")
    lp = LPIPS()  # random, explicitly not pretrained: only for the key check
    assert not lp.is_pretrained
    with pytest.raises(ValueError, match="random weights"):
        LPIPSWithDiscriminator(**_loss_params(m), perceptual=lp)
    loss = LPIPSWithDiscriminator(**_loss_params(m), perceptual=lp, allow_random_perceptual=True)
    sd = loss.state_dict()
    got = [(f"loss.{k}", list(v.shape)) for k, v in sd.items()]
    assert got == list(m["loss_keys"]["keys"].items())  # same keys, shapes and order
    non_f32 = {f"loss.{k}": str(v.dtype).removeprefix("torch.") for k, v in sd.items() if v.dtype != torch.float32}
    assert non_f32 == m["loss_keys"]["dtypes_non_float32"]


def test_vq_loss_keys_match_manifest(reference_dir):
    m = _manifest(reference_dir, "first_stage_vq_f4")
    loss = VQLPIPSWithDiscriminator(**_loss_params(m), perceptual=LPIPS(), allow_random_perceptual=True)
    sd = loss.state_dict()
    assert [(f"loss.{k}", list(v.shape)) for k, v in sd.items()] == list(m["loss_keys"]["keys"].items())
    non_f32 = {f"loss.{k}": str(v.dtype).removeprefix("torch.") for k, v in sd.items() if v.dtype != torch.float32}
    assert non_f32 == m["loss_keys"]["dtypes_non_float32"]
    assert not any(k.startswith("logvar") for k in sd)


def test_without_perceptual_there_are_no_perceptual_keys():
    with pytest.warns(PerceptualLossDisabledWarning):
        loss = LPIPSWithDiscriminator(disc_start=0)
    assert loss.perceptual_loss is None and not loss.uses_perceptual
    assert not any(k.startswith("perceptual_loss.") for k in loss.state_dict())


# --- discriminator ----------------------------------------------------------------------------------


def test_discriminator_init_is_reproducible_and_leaves_global_rng_alone():
    def build(seed):
        return weights_init(NLayerDiscriminator(ndf=8), torch.Generator().manual_seed(seed))

    a, b, c = build(1), build(1), build(2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.main[0].weight, c.main[0].weight)
    assert a.main[3].bias.abs().max() == 0 and a.main[2].bias is None  # BatchNorm bias 0; conv before BN: no bias
    assert abs(a.main[8].weight.std().item() - 0.02) < 0.002  # N(0, 0.02)
    state = torch.get_rng_state()
    LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())
    assert NLayerDiscriminator(ndf=8)(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)


# --- d-losses and the schedule ------------------------------------------------------------------------


def test_d_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2.5] -> 7/6; half the sum = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0, abs=1e-7)

    def softplus(v):
        return math.log1p(math.exp(v))

    expected = 0.5 * (
        sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3
    )
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, abs=1e-6)
    assert adopt_weight(0.7, 9, threshold=10) == 0.0
    assert adopt_weight(0.7, 10, threshold=10) == 0.7


# --- a tiny decoder whose last layer feeds the adaptive weight ----------------------------------------


class _TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, z):
        h = torch.nn.functional.interpolate(self.conv_in(z), scale_factor=4.0)  # (B, 8, 32, 32)
        return torch.tanh(self.conv_out(torch.nn.functional.silu(h)))


def _kl_case():
    g = torch.Generator().manual_seed(11)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    moments = torch.randn(2, 8, 8, 8, generator=g) * 0.5
    dec = _TinyDecoder()
    posterior = DiagonalGaussianDistribution(moments)
    return x, dec(posterior.mode()), posterior, dec


def _kl_loss(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerceptualLossDisabledWarning)
        return LPIPSWithDiscriminator(generator=torch.Generator().manual_seed(7), **kw)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    x, xrec, posterior, dec = _kl_case()
    loss_fn = _kl_loss(disc_start=0, kl_weight=1e-6, disc_weight=0.5, logvar_init=0.3)
    last = dec.conv_out.weight
    loss, log = loss_fn(x, xrec, posterior, 0, global_step=10, last_layer=last)

    # by hand: nll = sum(|x - xrec| / exp(logvar) + logvar) / B;  g = -mean D(xrec)
    logvar = torch.tensor(0.3)
    nll = ((x - xrec).abs() / logvar.exp() + logvar).sum() / 2
    g = -loss_fn.discriminator(xrec).mean()  # train-mode BatchNorm: batch statistics, same logits
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    expected = (grad_nll.norm() / (grad_g.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    assert 0 < expected.item() < 1e4 * 0.5  # the clamp is not active in this case
    assert log["train/d_weight"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert log["train/nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    kl = posterior.kl().sum() / 2
    assert log["train/kl_loss"].item() == pytest.approx(kl.item(), rel=1e-6)
    total = nll + 1e-6 * kl + expected * g
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert set(log) == {
        f"train/{k}"
        for k in ("total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight", "disc_factor", "g_loss")
    }


def test_gan_term_is_off_before_disc_start_and_on_after():
    x, xrec, posterior, dec = _kl_case()
    loss_fn = _kl_loss(disc_start=100, kl_weight=1e-6)
    last = dec.conv_out.weight
    nll_kl = ((x - xrec).abs()).sum() / 2 + 1e-6 * posterior.kl().sum() / 2  # logvar 0
    grad_plain = torch.autograd.grad(nll_kl, last, retain_graph=True)[0]

    before, log_b = loss_fn(x, xrec, posterior, 0, global_step=99, last_layer=last)
    assert log_b["train/disc_factor"].item() == 0.0
    assert before.item() == pytest.approx(nll_kl.item(), rel=1e-6)
    grad_before = torch.autograd.grad(before, last, retain_graph=True)[0]
    assert torch.allclose(grad_before, grad_plain, rtol=1e-5, atol=1e-7)  # g contributes nothing

    after, log_a = loss_fn(x, xrec, posterior, 0, global_step=100, last_layer=last)
    assert log_a["train/disc_factor"].item() == 1.0
    gan = log_a["train/d_weight"] * log_a["train/g_loss"]
    assert gan.abs().item() > 0
    assert after.item() == pytest.approx(nll_kl.item() + gan.item(), rel=1e-5)
    grad_after = torch.autograd.grad(after, last, retain_graph=True)[0]
    assert not torch.allclose(grad_after, grad_plain, rtol=1e-4, atol=1e-6)

    d_before, _ = loss_fn(x, xrec, posterior, 1, global_step=99)
    d_after, log_d = loss_fn(x, xrec, posterior, 1, global_step=100)
    assert d_before.item() == 0.0 and d_after.item() > 0
    assert set(log_d) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}
    # the discriminator step sees detached images: no gradient reaches the decoder
    assert torch.autograd.grad(d_after, last, allow_unused=True)[0] is None


def test_no_last_layer_gives_zero_weight_in_eval_and_an_error_in_training():
    x, xrec, posterior, _ = _kl_case()
    loss_fn = _kl_loss(disc_start=0)
    with pytest.raises(RuntimeError, match="last_layer"):
        loss_fn(x, xrec, posterior, 0, global_step=0)
    loss_fn.eval()
    with torch.no_grad():
        _, log = loss_fn(x, xrec, posterior, 0, global_step=0, split="val")
    assert log["val/d_weight"].item() == 0.0


def test_vq_loss_uses_mean_reductions():
    x, xrec, _, dec = _kl_case()
    with pytest.warns(PerceptualLossDisabledWarning):
        loss_fn = VQLPIPSWithDiscriminator(disc_start=5, codebook_weight=2.0)
    q = torch.tensor([0.25, 0.75])
    loss, log = loss_fn(q, x, xrec, 0, global_step=0, last_layer=dec.conv_out.weight)
    nll = (x - xrec).abs().mean()
    assert log["train/nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    assert loss.item() == pytest.approx(nll.item() + 2.0 * 0.5, rel=1e-6)  # GAN off before step 5
    assert log["train/p_loss"].item() == 0.0 and log["train/quant_loss"].item() == 0.5
    assert log["train/d_weight"].item() == 0.0  # the GAN work is skipped before disc_start
    loss, log = loss_fn(q, x, xrec, 0, global_step=5, last_layer=dec.conv_out.weight)
    assert log["train/d_weight"].item() > 0 and log["train/g_loss"].item() != 0


def test_no_perceptual_weights_runs_and_warns_exactly_once():
    x, xrec, posterior, dec = _kl_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn = LPIPSWithDiscriminator(disc_start=0)
        for step in range(2):
            loss_fn(x, xrec, posterior, 0, global_step=step, last_layer=dec.conv_out.weight)
            loss_fn(x, xrec, posterior, 1, global_step=step)
    ours = [w for w in caught if issubclass(w.category, PerceptualLossDisabledWarning)]
    assert len(ours) == 1
    assert "perceptual" in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the caller's line


def test_pretrained_lpips_is_used_by_the_loss(lpips_loaded):
    x, xrec, posterior, dec = _kl_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerceptualLossDisabledWarning)
        loss_fn = LPIPSWithDiscriminator(disc_start=0, perceptual=lpips_loaded, perceptual_weight=1.0)
    assert loss_fn.uses_perceptual
    loss_fn.train()
    assert not loss_fn.perceptual_loss.training  # LPIPS stays in eval mode (dropout off)
    _, log = loss_fn(x, xrec, posterior, 0, global_step=0, last_layer=dec.conv_out.weight)
    p = lpips_loaded(x, xrec)  # (B, 1, 1, 1)
    expected_rec = ((x - xrec).abs() + p).mean()
    assert log["train/rec_loss"].item() == pytest.approx(expected_rec.item(), rel=1e-5)


# --- LPIPS ------------------------------------------------------------------------------------------


def test_lpips_loads_torchvision_and_lpips_files(lpips_files, lpips_loaded):
    _, _, vgg, lin = lpips_files
    lp = lpips_loaded
    assert lp.is_pretrained and not lp.training
    sd = lp.state_dict()
    assert torch.equal(sd["net.slice1.0.weight"], vgg["features.0.weight"])
    assert torch.equal(sd["net.slice2.5.bias"], vgg["features.5.bias"])
    assert torch.equal(sd["net.slice5.28.weight"], vgg["features.28.weight"])
    assert torch.equal(sd["lin3.model.1.weight"], lin["lin3.model.1.weight"])
    assert torch.allclose(sd["scaling_layer.shift"].flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    assert torch.allclose(sd["scaling_layer.scale"].flatten(), torch.tensor([0.458, 0.448, 0.450]))
    assert all(not p.requires_grad for p in lp.parameters())


def test_lpips_distance_properties(lpips_loaded):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    lp = lpips_loaded
    d_xy = lp(x, y)
    assert d_xy.shape == (2, 1, 1, 1)
    assert (d_xy > 0).all()
    assert torch.allclose(d_xy, lp(y, x), rtol=1e-5, atol=1e-7)
    assert lp(x, x).abs().max().item() == 0.0
    x_req = x.clone().requires_grad_(True)
    lp(x_req, y).sum().backward()
    assert torch.isfinite(x_req.grad).all() and x_req.grad.abs().sum() > 0


def test_lpips_forward_matches_the_formula_written_out(lpips_files, lpips_loaded):
    """LPIPS eq. 1 by hand from the raw file tensors: taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
    F = torch.nn.functional
    _, _, vgg, lin = lpips_files
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(img):
        h, out = (img - shift) / scale, []
        for i in range(30):  # torchvision features[0:30]: conv at the stored indices, pools at 4, 9, 16, 23
            if f"features.{i}.weight" in vgg:
                h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            elif i in (4, 9, 16, 23):
                h = F.max_pool2d(h, 2, 2)
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out

    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 48, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 48, 32, generator=g) * 2 - 1
    d = torch.zeros(2, 1, 1, 1)
    for k, (fx, fy) in enumerate(zip(feats(x), feats(y), strict=True)):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = d + F.conv2d((nx - ny) ** 2, lin[f"lin{k}.model.1.weight"]).mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(lpips_loaded(x, y), d, rtol=1e-5, atol=1e-7)


def test_lpips_missing_keys_name_the_file(lpips_files, tmp_path):
    _, lin_path, vgg, lin = lpips_files
    bad_vgg = {k: v for k, v in vgg.items() if k != "features.28.weight"}
    torch.save(bad_vgg, tmp_path / "vgg16_broken.pth")
    with pytest.raises(LPIPSWeightsError, match=r"vgg16_broken\.pth.*features\.28\.weight"):
        LPIPS.from_files(tmp_path / "vgg16_broken.pth", lin_path)

    save_file({k: v for k, v in lin.items() if k != "lin3.model.1.weight"}, str(tmp_path / "lin_broken.safetensors"))
    with pytest.raises(LPIPSWeightsError, match=r"lin_broken\.safetensors.*lin3\.model\.1\.weight"):
        LPIPS.from_files(lpips_files[0], tmp_path / "lin_broken.safetensors")

    # the two files swapped: the lin file lacks every VGG key
    with pytest.raises(LPIPSWeightsError, match=r"vgg\.pth is missing 26 key"):
        LPIPS.from_files(lin_path, lpips_files[0])

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        LPIPS.from_files(tmp_path / "nowhere.pth", lin_path)
