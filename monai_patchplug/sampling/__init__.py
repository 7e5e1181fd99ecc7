"""Patch samplers: MONAI dictionary transforms that draw (random samplers) or enumerate (grid) patches."""

from .base import PatchSampler
from .grid import GridSampler
from .label import LabelSampler
from .uniform import UniformSampler
from .weighted import WeightedSampler

__all__ = ["PatchSampler", "UniformSampler", "WeightedSampler", "LabelSampler", "GridSampler"]
