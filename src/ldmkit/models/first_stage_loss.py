"""Stage-1 training losses: reconstruction + LPIPS + KL or codebook term + adaptive patch-GAN term.

``LPIPSWithDiscriminator`` (KL autoencoder, CompVis latent-diffusion ``contperceptual.py``) and
``VQLPIPSWithDiscriminator`` (VQ autoencoder, taming-transformers ``vqperceptual.py``), with the reference
reductions and state-dict keys (``logvar``, ``perceptual_loss.*``, ``discriminator.main.*``).

Notation (Esser et al. 2021, eq. 7; Rombach et al. 2022, App. G):
    rec      = |x - x_rec| + w_p * LPIPS(x, x_rec)              per pixel, (B, C, H, W)
    nll      = rec / exp(logvar) + logvar                       (KL loss; VQ uses rec directly)
    g        = -mean D(x_rec)                                   generator's adversarial loss
    lambda   = |grad_L nll| / (|grad_L g| + 1e-4)               adaptive weight at the decoder's last layer L
    L_ae     = nll + kl_weight * KL  + lambda * disc_weight * f(step) * g     (KL)
    L_ae     = nll + codebook_weight * L_codebook + lambda * disc_weight * f(step) * g     (VQ)
    L_disc   = f(step) * hinge(D(x), D(x_rec.detach()))
where f(step) = disc_factor once ``global_step >= disc_start`` and 0 before.

Two-optimiser protocol (as the reference's ``configure_optimizers`` / Lightning ``training_step``):
    opt_ae   = Adam(encoder, decoder, quant_conv, post_quant_conv [, quantize], betas=(0.5, 0.9))
    opt_disc = Adam(loss.discriminator_parameters(), betas=(0.5, 0.9))
    per batch: loss(..., optimizer_idx=0, last_layer=decoder.conv_out.weight) -> step opt_ae;
               loss(..., optimizer_idx=1) -> step opt_disc.
Zero the discriminator's gradients before its own backward: the generator step's backward also reaches
the discriminator's parameters (Lightning hides this by toggling ``requires_grad`` per optimiser).
The reference leaves ``loss.logvar`` out of ``opt_ae``, so it stays at ``logvar_init``; add it to
``opt_ae`` to learn it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.models.discriminator import NLayerDiscriminator, weights_init
from ldmkit.models.perceptual import LPIPS


class PerceptualLossDisabledWarning(UserWarning):
    """A stage-1 loss was built without pretrained LPIPS weights, so it trains without the perceptual term."""


class _HasKL(Protocol):
    def kl(self) -> Tensor: ...


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps, ``weight`` from then on (switches the GAN term on at disc_start)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """1/2 (mean softplus(-D(x)) + mean softplus(D(x_rec))): the non-saturating GAN loss on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def _l1(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).abs()


def _l2(x: Tensor, y: Tensor) -> Tensor:
    return (x - y) ** 2


PIXEL_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": _l1, "l2": _l2}


class _AdversarialLoss(nn.Module):
    """What both losses share: LPIPS handling, the discriminator, the adaptive weight and the D step."""

    def _setup(
        self,
        *,
        disc_start: int,
        pixelloss_weight: float,
        disc_num_layers: int,
        disc_in_channels: int,
        disc_factor: float,
        disc_weight: float,
        perceptual_weight: float,
        use_actnorm: bool,
        disc_conditional: bool,
        disc_ndf: int,
        disc_loss: str,
        perceptual: LPIPS | None,
        allow_random_perceptual: bool,
        pixel_loss: str,
        generator: torch.Generator | None,
    ) -> None:
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}")
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(PIXEL_LOSSES)}, got {pixel_loss!r}")
        if pixelloss_weight != 1.0:
            warnings.warn(
                f"pixelloss_weight={pixelloss_weight} has no effect: the reference stores it but never applies it, "
                "and this port keeps the reference's loss values",
                UserWarning,
                stacklevel=3,
            )
        self.pixel_weight = pixelloss_weight  # stored, unused (reference behaviour)
        self.pixel_loss = PIXEL_LOSSES[pixel_loss]
        self.perceptual_weight = perceptual_weight

        # perceptual_loss is registered before discriminator so the state-dict order matches the reference.
        if perceptual is not None:
            if not isinstance(perceptual, LPIPS):
                raise TypeError(f"perceptual must be an LPIPS module or None, got {type(perceptual).__name__}")
            if not perceptual.is_pretrained and not allow_random_perceptual:
                raise ValueError(
                    "the LPIPS module has random weights (is_pretrained is False); load real weights with "
                    "LPIPS.from_files(vgg16_path, lin_path). allow_random_perceptual=True exists for key and "
                    "shape tests only."
                )
            self.perceptual_loss: LPIPS | None = perceptual.eval()
        else:
            self.perceptual_loss = None
            if perceptual_weight > 0:
                warnings.warn(
                    f"{type(self).__name__}: no pretrained LPIPS given, so the perceptual term "
                    f"(perceptual_weight={perceptual_weight}) is skipped; pass perceptual=LPIPS.from_files(...) "
                    "to train with it",
                    PerceptualLossDisabledWarning,
                    stacklevel=3,
                )

        # Construction draws default inits from the global RNG; fork it so callers' streams are untouched,
        # then weights_init redraws every value from `generator`.
        with torch.random.fork_rng(devices=[]):
            disc = NLayerDiscriminator(
                input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=use_actnorm
            )
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        self.discriminator = weights_init(disc, generator)
        self.discriminator_iter_start = disc_start
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    @property
    def uses_perceptual(self) -> bool:
        """Whether forward adds the LPIPS term (a pretrained LPIPS is attached and perceptual_weight > 0)."""
        return self.perceptual_loss is not None and self.perceptual_weight > 0

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters for ``opt_disc`` (Adam, betas (0.5, 0.9))."""
        return self.discriminator.parameters()

    def _rec_and_p(self, inputs: Tensor, reconstructions: Tensor) -> tuple[Tensor, Tensor]:
        """rec = pixel loss + w_p * LPIPS, per pixel (B, C, H, W); and the LPIPS distance (B, 1, 1, 1) or 0."""
        rec = self.pixel_loss(inputs, reconstructions)  # (B, C, H, W)
        if self.uses_perceptual:
            assert self.perceptual_loss is not None
            p_loss = self.perceptual_loss(inputs, reconstructions)  # (B, 1, 1, 1)
            rec = rec + self.perceptual_weight * p_loss
        else:
            p_loss = rec.new_zeros(1)
        return rec, p_loss

    def _disc_input(self, x: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("disc_conditional=True needs cond")
            return x
        if not self.disc_conditional:
            raise ValueError("cond was given but disc_conditional is False")
        return torch.cat((x, cond), dim=1)

    def _generator_term(self, nll_loss: Tensor, reconstructions: Tensor, cond: Tensor | None,
                        last_layer: Tensor | None, disc_factor: float) -> tuple[Tensor, Tensor]:
        """(g_loss, adaptive weight). Before disc_start (disc_factor 0) the reference still runs the
        discriminator and two extra backward passes only to multiply them by 0; we skip that work, so the
        loss and its gradient are the same and g_loss / d_weight are logged as 0."""
        if disc_factor <= 0.0:
            zero = nll_loss.new_zeros(())
            return zero, zero
        logits_fake = self.discriminator(self._disc_input(reconstructions, cond))
        g_loss = -logits_fake.mean()
        return g_loss, self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)

    def calculate_adaptive_weight(self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor | None) -> Tensor:
        """lambda = |grad_L nll| / (|grad_L g| + 1e-4), clamped to [0, 1e4], detached, times disc_weight.

        Without gradients (``last_layer`` None, or outside autograd as in validation) it is 0 in eval mode,
        as in the reference; in training mode that is an error.
        """
        try:
            if last_layer is None:
                raise RuntimeError("last_layer is required for the adaptive GAN weight (decoder.conv_out.weight)")
            nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
            g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        except RuntimeError:
            if self.training:
                raise
            return nll_loss.new_zeros(())
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
        return d_weight * self.discriminator_weight

    def _discriminator_step(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int, cond: Tensor | None, split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits_real = self.discriminator(self._disc_input(inputs.detach(), cond))
        logits_fake = self.discriminator(self._disc_input(reconstructions.detach(), cond))
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.clone().detach().mean(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log


def _check_optimizer_idx(optimizer_idx: int) -> None:
    if optimizer_idx not in (0, 1):
        raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx!r}")


class LPIPSWithDiscriminator(_AdversarialLoss):
    """KL-autoencoder loss (latent-diffusion ``LPIPSWithDiscriminator``); keys ``logvar``,
    ``perceptual_loss.*`` (when an LPIPS is attached) and ``discriminator.main.*``.

    ``perceptual`` must be a pretrained ``LPIPS`` (``LPIPS.from_files``). With None the perceptual term is
    skipped and one ``PerceptualLossDisabledWarning`` is emitted at construction. A random LPIPS is
    refused unless ``allow_random_perceptual=True`` (key/shape tests only). ``generator`` seeds the
    discriminator init (None: a generator seeded with 0).
    """

    def __init__(
        self,
        disc_start: int,             # global step at which the GAN terms switch on
        logvar_init: float = 0.0,    # initial learned output log-variance
        kl_weight: float = 1.0,      # weight of KL(q(z|x) || N(0, I)); 1e-6 in the LDM configs
        pixelloss_weight: float = 1.0,  # stored but unused, as in the reference
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,    # GAN factor once global_step >= disc_start
        disc_weight: float = 1.0,    # multiplies the adaptive weight
        perceptual_weight: float = 1.0,
        *,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",    # "hinge" or "vanilla"
        perceptual: LPIPS | None = None,
        allow_random_perceptual: bool = False,
        pixel_loss: str = "l1",      # "l1" (reference) or "l2"
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self._setup(
            disc_start=disc_start, pixelloss_weight=pixelloss_weight, disc_num_layers=disc_num_layers,
            disc_in_channels=disc_in_channels, disc_factor=disc_factor, disc_weight=disc_weight,
            perceptual_weight=perceptual_weight, use_actnorm=use_actnorm, disc_conditional=disc_conditional,
            disc_ndf=disc_ndf, disc_loss=disc_loss, perceptual=perceptual,
            allow_random_perceptual=allow_random_perceptual, pixel_loss=pixel_loss, generator=generator,
        )

    def forward(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posteriors: _HasKL,
        optimizer_idx: int,
        global_step: int,
        last_layer: Tensor | None = None,
        *,
        split: str = "train",
        cond: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """optimizer_idx 0: autoencoder loss; 1: discriminator loss. Returns (loss, log).

        inputs, reconstructions: (B, C, H, W) in [-1, 1]; posteriors: anything with ``kl() -> (B,)``;
        last_layer: the decoder's last weight (``decoder.conv_out.weight``); weights: optional per-pixel
        weights for the nll (broadcast against (B, C, H, W)).
        """
        _check_optimizer_idx(optimizer_idx)
        if optimizer_idx == 1:  # nothing below feeds the discriminator loss
            return self._discriminator_step(inputs, reconstructions, global_step, cond, split)

        rec_loss, _ = self._rec_and_p(inputs, reconstructions)  # (B, C, H, W)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        b = nll_loss.shape[0]
        weighted_nll_loss = weighted_nll_loss.sum() / b  # summed over pixels, averaged over the batch
        nll_loss = nll_loss.sum() / b
        kl_loss = posteriors.kl()  # (B,)
        kl_loss = kl_loss.sum() / kl_loss.shape[0]

        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        g_loss, d_weight = self._generator_term(nll_loss, reconstructions, cond, last_layer, disc_factor)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, log


class VQLPIPSWithDiscriminator(_AdversarialLoss):
    """VQ-autoencoder loss (taming ``VQLPIPSWithDiscriminator``): mean reductions, no logvar.

    Keys ``perceptual_loss.*`` (when an LPIPS is attached) and ``discriminator.main.*``. ``perceptual``,
    ``allow_random_perceptual`` and ``generator`` behave as in ``LPIPSWithDiscriminator``.
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,   # weight of the quantiser's codebook + commitment loss
        pixelloss_weight: float = 1.0,  # stored but unused, as in the reference
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        *,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        perceptual: LPIPS | None = None,
        allow_random_perceptual: bool = False,
        pixel_loss: str = "l1",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.codebook_weight = codebook_weight
        self._setup(
            disc_start=disc_start, pixelloss_weight=pixelloss_weight, disc_num_layers=disc_num_layers,
            disc_in_channels=disc_in_channels, disc_factor=disc_factor, disc_weight=disc_weight,
            perceptual_weight=perceptual_weight, use_actnorm=use_actnorm, disc_conditional=disc_conditional,
            disc_ndf=disc_ndf, disc_loss=disc_loss, perceptual=perceptual,
            allow_random_perceptual=allow_random_perceptual, pixel_loss=pixel_loss, generator=generator,
        )

    def forward(
        self,
        codebook_loss: Tensor,
        inputs: Tensor,
        reconstructions: Tensor,
        optimizer_idx: int,
        global_step: int,
        last_layer: Tensor | None = None,
        *,
        split: str = "train",
        cond: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """optimizer_idx 0: autoencoder loss; 1: discriminator loss. Returns (loss, log)."""
        _check_optimizer_idx(optimizer_idx)
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, global_step, cond, split)

        rec_loss, p_loss = self._rec_and_p(inputs, reconstructions)  # (B, C, H, W), (B, 1, 1, 1) or (1,)
        nll_loss = rec_loss.mean()  # mean over batch and pixels (taming), not sum / B

        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        g_loss, d_weight = self._generator_term(nll_loss, reconstructions, cond, last_layer, disc_factor)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, log
