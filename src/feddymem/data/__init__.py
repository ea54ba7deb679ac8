"""Data: image sets (products) in real folder layouts, their partition over clients, torch datasets."""

from feddymem.data.datasets import ImageDataset
from feddymem.data.partition import ClientData, partition_clients
from feddymem.data.products import ProductSplit, Sample, load_product

__all__ = ["ClientData", "ImageDataset", "ProductSplit", "Sample", "load_product", "partition_clients"]
