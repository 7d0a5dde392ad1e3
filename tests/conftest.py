"""Test-wide setup. The tests run offline: HF_HUB_OFFLINE=1 is set here (unless the environment sets it), before
any test module imports rewardtune and through it huggingface_hub, and subprocesses the tests start inherit it.
huggingface_hub reads the variable once, at import: if a pytest plugin imported it before this file ran, its
constant is set to match too."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "huggingface_hub.constants" in sys.modules:  # imported before this file: it read the environment without us
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"].upper() in {"1", "ON", "YES", "TRUE"}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow reproduction tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_threads():
    """Puts torch's intra-op thread count back after a test that changes it (a run's `train.cpu_threads` does)."""
    import torch

    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads  # the real one, should a test patch it
    yield
    set_num_threads(threads)
