"""Datasets: Fashion-MNIST (IDX) and folders of images with optional captions."""

from sdengine.data.fashion_mnist import CLASS_NAMES, FashionMNIST, load_fashion_mnist
from sdengine.data.folders import ImageFolder, ImageFolderError, list_images, load_image

__all__ = [
    "CLASS_NAMES",
    "FashionMNIST",
    "ImageFolder",
    "ImageFolderError",
    "list_images",
    "load_fashion_mnist",
    "load_image",
]
