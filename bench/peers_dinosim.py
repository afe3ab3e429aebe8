"""DINOSim (napari-dinosim 0.1.5) as a long-lived timing worker for ``bench/bench_live.py``.

Runs in DINOSim's own environment, never in the project's (it needs torch 2.14.1 + torchvision, which do not
import beside the project's torch 2.13 wheel; nothing of DINOSim is in requirements.txt). It imports no project
code. Set-up of that environment (Python 3.11), once:

    python3.11 -m venv WORK/dsim_venv
    WORK/dsim_venv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers opencv-python-headless \\
        tifffile imagecodecs tqdm
    WORK/dsim_venv/bin/pip install --no-deps napari-dinosim==0.1.5

Protocol: one JSON request per line on stdin, one JSON answer per line on the original stdout (library prints
go to stderr, the worker's log). Commands: ``info``; ``warmup``; ``session`` {image, z, size, positive, added,
clicks} -> embedding time, first click and later clicks (seconds, measured here, server side).

What DINOSim runs, headless: its own pipeline (``DINOSim_pipeline``) with a random-init ViT-S/14 (transformers
``Dinov2Model``, SDPA attention; the plugin itself would load Meta's ``dinov2_vits14_reg`` from torch hub, which
needs the network), the plugin's defaults (518-px crops, no overlap, kNN k=5 reference, 3 x 3 Gaussian filter,
bilinear upsampling, threshold 0.5) on one 2-D slice (on a 3-D layer the plugin embeds every slice first).
Adapted from ``../shared/tools/peers/side_by_side.py`` (its DINOSim worker, unchanged in what it measures).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
import traceback


def tiled_plane(image: str, z: int, size_yx: tuple[int, int]):
    """(Y, X) plane z of the TIFF stack `image`, tiled (np.tile) to cover size_yx and cropped to it."""
    import numpy as np
    import tifffile

    plane = tifffile.imread(image)[z]
    reps = (-(-size_yx[0] // plane.shape[0]), -(-size_yx[1] // plane.shape[1]))
    return np.ascontiguousarray(np.tile(plane, reps)[: size_yx[0], : size_yx[1]])


def serve(handlers: dict) -> None:
    """Answer JSON requests from stdin until it closes; an exception becomes {'ok': False, 'error': ...}."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints ("Precomputing embeddings") go to the log, not into the answer pipe
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = handlers[request["cmd"]](request)
            answer.write(json.dumps({"ok": True, **result}) + "\n")
        except Exception as error:  # noqa: BLE001 - report it to the orchestrator and serve on
            traceback.print_exc()
            answer.write(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}) + "\n")


def main() -> None:
    import importlib.metadata
    import types

    import numpy as np
    import torch

    utils_dir = str(importlib.metadata.distribution("napari-dinosim").locate_file("napari_dinosim/utils"))
    package = types.ModuleType("dsim")
    package.__path__ = [utils_dir]  # the plugin's package __init__ imports napari: mount utils/ as a bare package
    sys.modules["dsim"] = package
    from torchvision.transforms import InterpolationMode
    from transformers import Dinov2Config, Dinov2Model

    from dsim.dinoSim_pipeline import DINOSim_pipeline
    from dsim.utils import ensure_valid_dtype, gaussian_kernel, get_img_processing_f, get_nhwc_image, torch_convolve

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                          patch_size=14, image_size=518)
    hf = Dinov2Model(config).eval()

    class HubInterface:  # the torch-hub model's interface that DINOSim_pipeline calls
        patch_size = 14

        def forward_features(self, x):
            with torch.inference_mode():
                return {"x_norm_patchtokens": hf(pixel_values=x).last_hidden_state[:, 1:]}

    kernel = torch.tensor(gaussian_kernel(size=3, sigma=1), dtype=torch.float32)
    smooth = lambda x: torch_convolve(x, kernel)  # noqa: E731 - the plugin's self.filter

    def click(pipe, coords) -> dict:
        start = time.perf_counter()
        pipe.set_reference_vector(coords, filter=smooth)
        distances = pipe.get_ds_distances_sameRef(verbose=False)
        pred = pipe.distance_post_processing(distances, smooth, upsampling_mode="bilinear")
        mask = (np.squeeze(pred) < 0.5).astype(np.uint8) * 255  # the plugin's threshold_im, slider default 0.5
        return {"mask_s": time.perf_counter() - start,
                "shapes": {"distances": list(np.shape(distances)), "pred": list(pred.shape), "mask": list(mask.shape)},
                "mask_fraction": float((mask > 0).mean())}

    def run(img, positive, added, clicks) -> dict:
        pipe = DINOSim_pipeline(HubInterface(), 14, torch.device("cpu"),
                                get_img_processing_f(resize_size=518, interpolation=InterpolationMode.BICUBIC), 384,
                                dino_image_size=518)
        image = ensure_valid_dtype(get_nhwc_image(img))
        start = time.perf_counter()
        pipe.pre_compute_embeddings(image, overlap=(0, 0), padding=(0, 0), crop_shape=(518, 518, image.shape[-1]),
                                    verbose=False, batch_size=1)
        embed_s = time.perf_counter() - start
        coords = [(0, x, y) for x, y in positive]  # DINOSim's (n, x, y); positives only
        first = click(pipe, coords)
        later = [click(pipe, coords + [(0, x, y) for x, y in added[:k]]) for k in range(1, clicks + 1)]
        result = {"embed_s": embed_s, "first": first, "clicks": later, "n_crops": int(pipe.embeddings.shape[0]),
                  "embedding_shape": list(pipe.embeddings.shape)}
        del pipe
        gc.collect()
        return result

    def session(req: dict) -> dict:
        size = tuple(req["size"])
        img = tiled_plane(req["image"], req["z"], size)
        result = run(img, req["positive"], req["added"], req["clicks"])
        return {"system": "dinosim", "size": list(size), **result,
                "slice_sha": hashlib.sha1(img.tobytes()).hexdigest()[:12]}

    def warmup(req: dict) -> dict:
        img = tiled_plane(req["image"], req["z"], (518, 518))
        start = time.perf_counter()
        run(img, req["positive"], req["added"], 1)
        return {"warmup_s": time.perf_counter() - start}

    def info(_: dict) -> dict:
        import transformers

        return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "napari_dinosim": importlib.metadata.version("napari-dinosim"), "numpy": np.__version__,
                "threads": torch.get_num_threads(), "attn_implementation": hf.config._attn_implementation}

    serve({"info": info, "warmup": warmup, "session": session})


if __name__ == "__main__":
    main()
