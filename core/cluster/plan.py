"""Blocks of slices: the unit of work of a cluster run, aligned with the stack file's z-chunks.

A block is ``block_slices`` consecutive slices, a whole number of the file's z-chunks (an Imaris dataset is
stored in chunks of e.g. 32 slices; TIFF pages and image folders in single planes), so that each chunk is
decompressed by one task, once. A block's masks are whole chunks of the OME-Zarr output
(``core.io.ome_zarr``), so no two tasks ever write the same chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from core.io.base import Stack
from core.io.ims import ImsStack, open_h5

__all__ = ["DEFAULT_BLOCK_SLICES", "Block", "z_chunk_depth", "block_slices_for", "plan_blocks"]

#: Slices per block when the file has single-plane chunks (TIFF, images): large enough that a block's fixed costs
#: (opening the stack, the z-smoothing halo) stay small, small enough that 8+ workers share one sample.
DEFAULT_BLOCK_SLICES = 16


@dataclass(frozen=True)
class Block:
    """Slices [z0, z1) of a stack; ``z_values`` are the requested ones among them, ascending."""

    index: int
    z0: int
    z1: int
    z_values: tuple[int, ...]


def z_chunk_depth(stack: Stack, channel: int = 0, timepoint: int = 0) -> int:
    """Slices per storage chunk along z at full resolution: an .ims dataset's chunk depth, 1 for formats stored
    plane by plane (TIFF pages, image files)."""
    if isinstance(stack, ImsStack):
        with open_h5(stack.path) as handle:
            data = handle[f"{stack.layout.group_path(0, timepoint, stack.resolve_channel(channel))}/Data"]
            return int(data.chunks[0]) if data.chunks else int(stack.shape[0])
    return 1


def block_slices_for(chunk_depth: int, n_slices: int, target: int | None = None) -> int:
    """Slices per block: the whole number of ``chunk_depth``-slice chunks nearest ``target`` (at least one chunk;
    default DEFAULT_BLOCK_SLICES), never more than the stack.

    >>> block_slices_for(32, 632), block_slices_for(1, 632), block_slices_for(1, 632, target=5)
    (32, 16, 5)
    >>> block_slices_for(32, 20)
    20
    """
    target = DEFAULT_BLOCK_SLICES if target is None else int(target)
    if target < 1:
        raise ValueError(f"a block needs at least one slice, got {target}")
    chunks = max(1, round(target / max(1, chunk_depth)))
    return max(1, min(chunk_depth * chunks, int(n_slices)))


def plan_blocks(n_slices: int, block_slices: int, z_values: Sequence[int]) -> list[Block]:
    """The blocks holding at least one of ``z_values`` (any order, repeats ignored), in z order.

    >>> [(b.index, b.z0, b.z1, b.z_values) for b in plan_blocks(10, 4, [9, 0, 1])]
    [(0, 0, 4, (0, 1)), (2, 8, 10, (9,))]
    """
    by_block: dict[int, list[int]] = {}
    for z in sorted(set(int(z) for z in z_values)):
        by_block.setdefault(z // block_slices, []).append(z)
    return [Block(index, index * block_slices, min((index + 1) * block_slices, n_slices), tuple(zs))
            for index, zs in sorted(by_block.items())]
