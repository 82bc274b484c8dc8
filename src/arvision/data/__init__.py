"""Image data: datasets (Fashion-MNIST, procedural shapes, image folders) and the LightningDataModule."""

from __future__ import annotations

from arvision.data.datamodule import DATASET_NAMES, ImageDataModule
from arvision.data.datasets import (
    SHAPE_NAMES,
    DatasetNotFound,
    ImageFolderDataset,
    ShapesDataset,
    TensorImageDataset,
    load_fashion_mnist,
    to_uint8,
)

__all__ = [
    "DATASET_NAMES",
    "SHAPE_NAMES",
    "DatasetNotFound",
    "ImageDataModule",
    "ImageFolderDataset",
    "ShapesDataset",
    "TensorImageDataset",
    "load_fashion_mnist",
    "to_uint8",
]
