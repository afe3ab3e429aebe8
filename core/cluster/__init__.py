"""Scale-out on Dask: batch apply and embedding over many workers, masks as resumable OME-Zarr.

One concept per module, in the order a run uses them:

- ``plan``: blocks of slices aligned with the stack file's z-chunks (the unit of work);
- ``job``: what a run does, decided by the submitter: the backbone recipe, the output's identity (what a rerun
  must share to resume), the per-stack statistics every worker uses (``prepare_apply``);
- ``tasks``: what a worker runs for one block (``apply_block``, ``embed_block``);
- ``run``: where blocks run (``Cluster``: a LocalCluster or a running scheduler; or this process), submitting,
  waiting, cancelling (``submit_apply``, ``run_apply_here``, ``ApplyRun``, ``request_cancel``);
- ``progress``: progress and results read from the output alone (``read_progress``, ``read_result``).

The output format itself (NGFF metadata, pyramid, per-block marks) is ``core.io.ome_zarr``. The package sits beside
``core.batch`` (whose ``apply_prototype`` segments each block) and below ``core.cli``; see docs/scaling.md.
"""

from core.cluster.job import ApplyTarget, BackboneRecipe, EmbedJob, prepare_apply
from core.cluster.plan import Block, block_slices_for, plan_blocks, z_chunk_depth
from core.cluster.progress import RunProgress, read_progress, read_result
from core.cluster.run import ApplyRun, Cluster, ClusterError, request_cancel, run_apply_here, run_embed, submit_apply
from core.cluster.tasks import BlockOutcome

__all__ = [
    "ApplyRun",
    "ApplyTarget",
    "BackboneRecipe",
    "Block",
    "BlockOutcome",
    "Cluster",
    "ClusterError",
    "EmbedJob",
    "RunProgress",
    "block_slices_for",
    "plan_blocks",
    "prepare_apply",
    "read_progress",
    "read_result",
    "request_cancel",
    "run_apply_here",
    "run_embed",
    "submit_apply",
    "z_chunk_depth",
]
