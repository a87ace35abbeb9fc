"""Kept for the trainers that import it by this name: everything lives in :mod:`sdengine.io.images`."""

from sdengine.io.images import make_grid, save_image_atomic, to_pil, to_uint8

__all__ = ["make_grid", "save_image_atomic", "to_pil", "to_uint8"]
