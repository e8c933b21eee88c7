import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import synth  # noqa: E402 (after the path)

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: each worker gets its share of the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, whatever ran before it: a random input a test draws
    without its own seed is still fixed, and no test's outcome depends on which tests ran first."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """train.main sets process-wide knobs (--threads, flush-denormal); other test files get them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    """A micro built-in dataset (8 training images of 32 x 32 pixels): the data of every train.main run."""
    root = str(tmp_path_factory.mktemp("micro_synth"))
    synth.make_synth(root, seed=0, n_train=8, n_val=2, n_testA=1, n_testB=1)
    return root
