"""Networks: first-stage autoencoders (KL and VQ), the denoising UNet and the conditioners."""

from ldmkit.models.autoencoder_kl import AutoencoderConfig, AutoencoderKL
from ldmkit.models.vq import QuantizeInfo, VectorQuantizer, VQModel

__all__ = ["AutoencoderConfig", "AutoencoderKL", "QuantizeInfo", "VQModel", "VectorQuantizer"]
