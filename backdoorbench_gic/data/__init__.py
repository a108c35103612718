"""Datasets by BackdoorBench names, held in memory as uint8 tensors, and the views defenses iterate over."""
from .imageset import Batch, ImageSet
from .specs import DatasetSpec, get_spec

__all__ = ["Batch", "ImageSet", "DatasetSpec", "get_spec"]
