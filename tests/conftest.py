"""Shared test setup: CPU only, quiet logs, one torch thread, accelerator-only markers skipped."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    if "tpu_only" in item.keywords and backend != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
    if "gpu_only" in item.keywords and backend != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  try:
    import torch
    torch.set_num_threads(1)
  except ImportError:
    pass
  yield
