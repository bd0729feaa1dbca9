"""Age buckets, shared by validation (every bucket present) and the split (stratification)."""

from __future__ import annotations

import numpy as np


def age_bucket_names(edges: list[int]) -> list[str]:
    """Names like '0-9' for the half-open buckets [edges[i], edges[i+1])."""
    return [f"{low}-{high - 1}" for low, high in zip(edges, edges[1:], strict=False)]


def bucket_ages(ages, edges: list[int]) -> list[str]:
    """The bucket name of each age; ages past the last edge fall in the last bucket."""
    names = age_bucket_names(edges)
    index = np.clip(np.searchsorted(edges, np.asarray(ages), side="right") - 1, 0, len(names) - 1)
    return [names[i] for i in index]
