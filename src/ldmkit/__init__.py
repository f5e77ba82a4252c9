"""ldmkit: Latent Diffusion Models (Rombach et al., CVPR 2022) in plain PyTorch."""

__version__ = "0.1.0"


def __getattr__(name: str):  # `from ldmkit import Pipeline` without importing torch for `import ldmkit`
    if name in ("Pipeline", "LatentDiffusionPipeline"):
        from .pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
