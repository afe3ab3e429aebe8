"""The bundled demo: a small synthetic fluorescence stack with its ground truth, made here from a seed.

It imitates a two-photon vessel stack: bright tubes of varying width winding through the volume (the
structure), round bright cells of similar intensity (to be clicked as negatives), uneven background,
Poisson-like shot noise and a slow intensity drift along z. Channel 0 is the image, channel 1 the
ground-truth mask (0/1), like the lab's Imaris files whose last channel is the expert mask. Nothing in it
comes from a real sample; the app says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from core.io.atomic import atomic_output

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = PROJECT_ROOT / "assets" / "demo"
DEMO_NAME = "synthetic_vessels.ome.tif"
DEMO_SHAPE = (24, 256, 256)  # (Z, Y, X)
DEMO_VOXEL_UM = (2.0, 0.8, 0.8)  # (z, y, x)
DEMO_SEED = 20261125


def _tube_field(shape: tuple[int, int, int], rng: np.random.Generator, n_tubes: int) -> tuple[np.ndarray, np.ndarray]:
    """Distance-based tubes: returns (intensity (Z, Y, X) float32 0..1, mask bool)."""
    z_count, height, width = shape
    centre_lines = np.zeros(shape, dtype=bool)
    radius_map = np.zeros(shape, dtype=np.float32)
    for _ in range(n_tubes):
        start = rng.uniform([0, 0, 0], [z_count, height, width])
        direction = rng.normal(size=3)
        direction[0] *= 0.03  # mostly in-plane, as vessels in a thin optical section
        direction /= np.linalg.norm(direction)
        radius = rng.uniform(3.0, 7.0)
        position = start.copy()
        for _ in range(1500):
            direction += rng.normal(scale=0.08, size=3) * np.array([0.05, 1.0, 1.0])
            direction /= np.linalg.norm(direction)
            position += direction * 1.0
            if not (0 <= position[0] < z_count and 0 <= position[1] < height and 0 <= position[2] < width):
                break
            index = tuple(int(v) for v in position)
            centre_lines[index] = True
            radius_map[index] = radius
    distance, nearest = ndimage.distance_transform_edt(~centre_lines, sampling=(2.5, 1.0, 1.0), return_indices=True)
    local_radius = radius_map[tuple(nearest)]
    mask = distance <= 0.85 * local_radius
    intensity = np.exp(-0.5 * (distance / np.maximum(local_radius * 0.6, 1.0)) ** 2).astype(np.float32)
    return intensity, mask


def make_demo(shape: tuple[int, int, int] = DEMO_SHAPE, seed: int = DEMO_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Generate the demo: (image (Z, Y, X) uint16, mask (Z, Y, X) uint8 0/1). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    tubes, mask = _tube_field(shape, rng, n_tubes=22)
    z_count, height, width = shape
    # Round cells: bright blobs that are not structure.
    cells = np.zeros(shape, np.float32)
    for _ in range(30):
        centre = rng.uniform([0, 0, 0], [z_count, height, width])
        radius = rng.uniform(4.0, 7.0)
        zz, yy, xx = np.ogrid[:z_count, :height, :width]
        distance = np.sqrt(((zz - centre[0]) * 2.5) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
        cells = np.maximum(cells, np.clip(1.2 - distance / radius, 0, 1) * rng.uniform(0.6, 0.9))
    cells[mask] = 0
    yy, xx = np.mgrid[:height, :width]
    background = 0.15 + 0.1 * np.sin(xx / 41.0) * np.cos(yy / 57.0)
    drift = np.linspace(1.0, 0.75, z_count)[:, None, None]
    signal = (background[None] + 0.8 * tubes * rng.uniform(0.8, 1.0) + cells) * drift
    photons = rng.poisson(np.clip(signal, 0, None) * 400.0).astype(np.float32)
    blurred = ndimage.gaussian_filter(photons, sigma=(0.5, 0.8, 0.8))
    image = np.clip(blurred * 4.0 + 200.0, 0, 65535).astype(np.uint16)
    return image, mask.astype(np.uint8)


def write_demo(directory: Path = DEMO_DIR, *, overwrite: bool = False) -> Path:
    """Write the demo as a 2-channel OME-TIFF (channel 0 image, channel 1 ground truth) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DEMO_NAME
    if path.exists() and not overwrite:
        return path
    image, mask = make_demo()
    data = np.stack([image, mask.astype(np.uint16)], axis=1)  # (Z, C, Y, X)
    z_um, y_um, x_um = DEMO_VOXEL_UM
    with atomic_output(path, overwrite=True) as temp:
        _write_demo(temp, data, z_um, y_um, x_um)
    return path


def _write_demo(temp: Path, data: np.ndarray, z_um: float, y_um: float, x_um: float) -> None:
    import tifffile  # lazily: `python -m core demo --ensure` starts the app script and usually finds the file

    tifffile.imwrite(
        temp,
        data,
        ome=True,
        photometric="minisblack",
        compression="zlib",
        metadata={
            "axes": "ZCYX",
            "PhysicalSizeX": x_um,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": y_um,
            "PhysicalSizeYUnit": "µm",
            "PhysicalSizeZ": z_um,
            "PhysicalSizeZUnit": "µm",
            "Channel": {"Name": ["Synthetic vessels (demo)", "Ground truth (synthetic)"]},
            "Description": "Protoscope synthetic demo stack (generated by core/demo.py, not a real sample)",
        },
    )


def ensure_demo(directory: Path = DEMO_DIR) -> Path:
    """The demo's path, writing it first if it is missing."""
    path = directory / DEMO_NAME
    return path if path.exists() else write_demo(directory)
