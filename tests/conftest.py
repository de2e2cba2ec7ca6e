"""Test-wide settings: one torch thread per process, so tests, Ray workers and servers share the cores fairly."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (the thread count must be set before torch starts its pool)

torch.set_num_threads(1)
