"""Test-wide settings: offline, single-threaded, deterministic.

One torch thread per process keeps the suite fast and stable on a shared 2-core machine (OpenMP
spin-waiting makes 2-thread torch collapse when another process is busy).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests when CUDA is absent (everything else runs by default)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def tiny_cfg():
    """The ``tiny-test`` preset (seconds-fast model with every code path)."""
    from gres.config import PRESETS

    return PRESETS["tiny-test"]()


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg):
    """A seeded, randomly initialised ``tiny-test`` model in eval mode (one per test module)."""
    from gres import engine

    engine.seed_everything(0)
    return engine.prepare_model(tiny_cfg).eval()


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """The "tiny" synthetic dataset (seed 0), generated once per session. Read-only: a test that
    changes files copies it first."""
    from gres.data.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "synthetic-tiny"
    generate(root, "tiny", seed=0, progress=False)
    return root
