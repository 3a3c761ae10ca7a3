"""Shared set-up: no test writes into the user's cache (results or generated kernel modules)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """$SUPEROPT_CACHE_DIR points into the session's temporary folder, so the default cache (results, and the
    Triton modules every `compile` writes) is never ~/.cache/superopt; tests that want their own set it again."""
    old = os.environ.get("SUPEROPT_CACHE_DIR")
    os.environ["SUPEROPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("superopt-cache"))
    yield
    if old is None:
        del os.environ["SUPEROPT_CACHE_DIR"]
    else:
        os.environ["SUPEROPT_CACHE_DIR"] = old


def pytest_configure(config: pytest.Config) -> None:
    """Triton kernels on CPU tensors run under its interpreter, which a process chooses before importing triton;
    the suite's tests import triton in many orders, so it is chosen here, once (a machine with a GPU keeps it
    off: CPU tensors then run on the GPU)."""
    import torch

    if not torch.cuda.is_available():
        from superopt.kernels.triton_codegen import use_interpreter

        use_interpreter()
