"""Label conventions shared by training, evaluation and serving.

Age buckets (validation checks every bucket is present, the split stratifies by them),
the probability at which a face counts as female, and the age from which gender
accuracy is also reported on its own (gender is hard to see in young children).
"""

from __future__ import annotations

import numpy as np

GENDER_THRESHOLD = 0.5  # gender 1 is female; the model outputs the probability of female
ADULT_AGE = 18


def age_bucket_names(edges: list[int]) -> list[str]:
    """Names like '0-9' for the half-open buckets [edges[i], edges[i+1])."""
    return [f"{low}-{high - 1}" for low, high in zip(edges, edges[1:], strict=False)]


def bucket_ages(ages, edges: list[int]) -> list[str]:
    """The bucket name of each age; ages past the last edge fall in the last bucket."""
    names = age_bucket_names(edges)
    index = np.clip(np.searchsorted(edges, np.asarray(ages), side="right") - 1, 0, len(names) - 1)
    return [names[i] for i in index]
