"""Age and gender from face images: an MLOps pipeline from labelled faces to a served model."""

import os

# Reproducible training first: TensorFlow would pick its oneDNN kernels by itself on some CPUs, and
# they round differently from run to run (training.cpu_kernels). TF_ENABLE_ONEDNN_OPTS=1 still chooses
# them. It must be set before TensorFlow loads, so here, before any agegender module imports it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
