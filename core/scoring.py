"""Prototype similarity: S = Sp - λ·Sn for every patch (thesis §3.5.3, docs/spec/PIPELINE.md A.4-A.5).

All embeddings are compared by cosine similarity, i.e. dot products of L2-normalised vectors. The class
similarity Sp (or Sn) of a patch is, by scoring method:

- ``mean``  cos(patch, mean prototype) — one prototype per class, the thesis;
- ``multi`` max over the class's k-means prototypes of cos(patch, prototype);
- ``knn``   mean of the k largest cos(patch, clicked patch) over the class's clicked patches (DINOSim scores
            by the nearest reference patches).
With no negative examples, S = Sp.
"""

from __future__ import annotations

import numpy as np

from core.config import Scoring


def l2_normalize(vectors: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit-length vectors along ``axis`` (float32); zero vectors stay zero."""
    data = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(data, axis=axis, keepdims=True)
    return data / np.maximum(norms, np.float32(1e-12))


def mean_prototype(embeddings: np.ndarray) -> np.ndarray:
    """(N, D) embeddings -> (1, D) unit mean of their unit vectors (thesis: normalise, average, normalise)."""
    unit = l2_normalize(embeddings)
    return l2_normalize(unit.mean(axis=0, keepdims=True))


def kmeans_prototypes(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(N, D) -> (min(k, N), D) unit k-means centres on the unit sphere (spherical k-means, k-means++ init)."""
    unit = l2_normalize(embeddings)
    n = unit.shape[0]
    k = min(k, n)
    if k <= 1:
        return mean_prototype(unit)
    rng = np.random.default_rng(seed)
    centres = [unit[rng.integers(n)]]
    for _ in range(1, k):
        distance = 1.0 - np.max(unit @ np.stack(centres).T, axis=1)
        distance = np.clip(distance, 0.0, None)
        total = distance.sum()
        index = rng.choice(n, p=distance / total) if total > 0 else rng.integers(n)
        centres.append(unit[index])
    centre_array = np.stack(centres)
    for _ in range(50):
        assignment = np.argmax(unit @ centre_array.T, axis=1)
        updated = centre_array.copy()
        for cluster in range(k):
            members = unit[assignment == cluster]
            if len(members):
                updated[cluster] = l2_normalize(members.mean(axis=0))
        if np.allclose(updated, centre_array, atol=1e-6):
            break
        centre_array = updated
    return centre_array.astype(np.float32)


def class_similarity(
    embeddings: np.ndarray, references: np.ndarray, scoring: Scoring, knn_k: int = 5
) -> np.ndarray:
    """Similarity of each embedding to one class.

    embeddings : (..., D) any norm. references : (K, D) unit prototypes ('mean'/'multi') or clicked patch
    embeddings ('knn'). Returns (...) float32.
    """
    import torch  # lazily (start-up time): topk and matmul on large maps

    shape = embeddings.shape[:-1]
    flat = torch.from_numpy(l2_normalize(embeddings.reshape(-1, embeddings.shape[-1])))
    refs = torch.from_numpy(l2_normalize(references))
    cosine = flat @ refs.T  # (N, K)
    if scoring is Scoring.KNN:
        k = min(knn_k, refs.shape[0])
        value = torch.topk(cosine, k, dim=1).values.mean(dim=1)
    else:
        value = cosine.max(dim=1).values
    return value.numpy().reshape(shape).astype(np.float32)


def score_embeddings(
    embeddings: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray | None,
    *,
    negative_weight: float = 0.8,
    scoring: Scoring = Scoring.MEAN,
    knn_k: int = 5,
) -> np.ndarray:
    """Prototype similarity for every patch.

    embeddings : (H, W, D) float, one embedding per patch, any norm.
    positive, negative : (K, D) prototypes (or clicked embeddings for 'knn'); negative may be None or empty.
    Returns (H, W) float32: Sp - negative_weight * Sn.
    """
    if positive is None or len(positive) == 0:
        raise ValueError("at least one positive example is needed to score")
    score = class_similarity(embeddings, positive, scoring, knn_k)
    if negative is not None and len(negative) and negative_weight:
        score = score - np.float32(negative_weight) * class_similarity(embeddings, negative, scoring, knn_k)
    return score.astype(np.float32)
