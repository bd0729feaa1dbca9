"""Age and gender from face images: an MLOps pipeline from labelled faces to a served model."""

import os

# Reproducible training first: oneDNN's kernels round differently from run to run, and TensorFlow
# turns them on by itself on CPUs with AVX-512 VNNI, BF16 or AMX. TF_ENABLE_ONEDNN_OPTS=1 chooses them
# (a train step 1.35x faster on an AVX2 CPU). It must be set before TensorFlow is imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
