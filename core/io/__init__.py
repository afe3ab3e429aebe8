"""Reading microscopy stacks and writing masks: Imaris ``.ims``, TIFF / OME-TIFF, images.

The package's public names; the readers and writers live in its modules.
"""

from core.io.base import (
    SUPPORTED_SUFFIXES,
    Stack,
    VoxelSize,
    default_image_channel,
    natural_sort_key,
    open_stack,
    rgb_to_grey,
    stack_label,
    unit_to_um,
)

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Stack",
    "VoxelSize",
    "default_image_channel",
    "natural_sort_key",
    "open_stack",
    "rgb_to_grey",
    "stack_label",
    "unit_to_um",
]
