"""Grid inference: aggregate patch outputs into a volume (GridAggregator) and a MONAI inferer built on it."""

from .aggregator import GridAggregator
from .inferer import GridInferer

__all__ = ["GridAggregator", "GridInferer"]
