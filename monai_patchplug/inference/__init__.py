"""Grid inference: aggregate patch outputs into a volume (GridAggregator) and a MONAI inferer built on it."""

from .aggregator import GridAggregator
from .inferer import GridInferer
from .inputs import lazy_batch
from .mergers import CropMerger, GaussianMerger, HannMerger

__all__ = ["GridAggregator", "GridInferer", "HannMerger", "GaussianMerger", "CropMerger", "lazy_batch"]
