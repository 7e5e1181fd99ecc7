"""monai_patchplug: TorchIO-style patch sampling and grid aggregation for MONAI."""

from ._shapes import LOCATION, get_batch_images_and_size, parse_spatial_shape
from .inference import CropMerger, GaussianMerger, GridAggregator, GridInferer, HannMerger, lazy_batch
from .label_index import LabelIndex
from .loading import LazyVolume, LoadLazyd
from .queue import PatchQueue
from .sampling import GridSampler, LabelSampler, PatchSampler, UniformSampler, WeightedSampler
from .store import PatchStore

__version__ = "0.1.0"

__all__ = [
    "LOCATION",
    "parse_spatial_shape",
    "get_batch_images_and_size",
    "PatchSampler",
    "UniformSampler",
    "WeightedSampler",
    "LabelSampler",
    "GridSampler",
    "GridAggregator",
    "GridInferer",
    "HannMerger",
    "GaussianMerger",
    "CropMerger",
    "lazy_batch",
    "PatchQueue",
    "LazyVolume",
    "LoadLazyd",
    "LabelIndex",
    "PatchStore",
]
