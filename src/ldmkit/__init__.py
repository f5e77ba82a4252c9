"""ldmkit: Latent Diffusion Models (Rombach et al., CVPR 2022) in plain PyTorch."""

__version__ = "0.1.0"
