"""Age and gender from face images: an MLOps pipeline from labelled faces to a served model."""

import os

# Reproducible training first: TensorFlow would pick its oneDNN kernels by itself on some CPUs, and
# they round differently from run to run (training.cpu_kernels). TF_ENABLE_ONEDNN_OPTS=1 still chooses
# them. It must be set before TensorFlow loads, so here, before any agegender module imports it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Flows run without PREFECT_API_URL start Prefect's temporary server, which gives up after 20 s; on a
# busy 2-core host its start took longer (`agegender monitor drift` failed so in CI). A user's value wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
