"""The inference API (`Pipeline`), its inputs and outputs. Stands on the model layer; never on `training/`."""

from .generation import Generation, read_parameters, save_png
from .pipeline import LatentDiffusionPipeline, Pipeline

__all__ = ["Generation", "LatentDiffusionPipeline", "Pipeline", "read_parameters", "save_png"]
