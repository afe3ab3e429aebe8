"""Reading microscopy stacks and writing masks: Imaris ``.ims``, TIFF / OME-TIFF, images.

The package's public names; the readers and writers live in its modules:

- ``base``: `Stack`, `VoxelSize`, units, `stack_label`, the positional channel convention, suffixes, and the edge
  checks every reader shares (`MAX_PLANE_PIXELS`, positive sizes, numeric pixel types);
- ``tiff``, ``images``, ``ims``: the readers (`TiffStack`, `ImageStack` / `ImageFolderStack`, `ImsStack`);
- ``opening``: `open_stack`, which picks the reader;
- ``channels``: channel names: `default_image_channel` (the one rule of the app and the CLI), the ground truth;
- ``masks``, ``writers``, ``ims_append``: mask arrays, mask files, a mask channel in an ``.ims`` copy;
- ``atomic``: the temp-file-and-rename helper every written file goes through (PID-named temps; stale
  temps of dead processes are removed before the next write to their folder).

Imports run one way: base <- readers <- opening; masks, atomic <- ims_append <- writers.
"""

from core.io.base import (
    MAX_PLANE_PIXELS,
    SUPPORTED_SUFFIXES,
    Stack,
    VoxelSize,
    natural_sort_key,
    rgb_to_grey,
    stack_label,
    unit_to_um,
)
from core.io.channels import (
    channel_label,
    default_image_channel,
    guess_truth_channel,
    is_protoscope_mask,
    matching_channel,
)
from core.io.opening import open_stack

__all__ = [
    "MAX_PLANE_PIXELS",
    "SUPPORTED_SUFFIXES",
    "Stack",
    "VoxelSize",
    "channel_label",
    "default_image_channel",
    "guess_truth_channel",
    "is_protoscope_mask",
    "matching_channel",
    "natural_sort_key",
    "open_stack",
    "rgb_to_grey",
    "stack_label",
    "unit_to_um",
]
