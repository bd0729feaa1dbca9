"""Age and gender from face images: an MLOps pipeline from labelled faces to a served model."""

import os

# Reproducible training first: oneDNN's kernels round differently from run to run, and TensorFlow
# turns them on by itself on CPUs with AVX-512 VNNI, BF16 or AMX. TF_ENABLE_ONEDNN_OPTS=1 chooses them
# (a train step 1.35x faster on an AVX2 CPU, 1.74x on an AVX-512 one). It must be set before TensorFlow loads.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
