"""Stage-2 generators, one paradigm per module."""

from arvision.generators.base import Generator, IncompatibleTokenizer, require
from arvision.generators.raster import RasterGenerator

__all__ = ["Generator", "IncompatibleTokenizer", "RasterGenerator", "require"]
