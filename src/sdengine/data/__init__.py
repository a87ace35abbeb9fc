"""Datasets: Fashion-MNIST (IDX) and folders of images with optional captions."""

from sdengine.data.fashion_mnist import CLASS_NAMES, FashionMNIST, load_fashion_mnist

__all__ = ["CLASS_NAMES", "FashionMNIST", "load_fashion_mnist"]
