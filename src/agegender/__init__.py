"""Age and gender from face images: an MLOps pipeline from labelled faces to a served model."""

import os

# TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX-512 VNNI, BF16 or AMX. On an
# AVX2 CPU they still make a train step of the compact network 1.35x faster (benchmarks/train_step.py).
# It must be set before TensorFlow is imported; TF_ENABLE_ONEDNN_OPTS=0 turns it off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
