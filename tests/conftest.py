import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch, numpy and synth are imported where they are used: pytest -n's controller process loads this file too,
# runs no test, and would spend ~3 s of CPU importing torch while its workers start.

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: each worker gets its share of the cores
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# pytest -n hands the test modules out in collection order (pytest.ini: --no-loadscope-reorder): the slowest
# first, so that no worker starts a long module while the others are nearly done.
SLOWEST_FIRST = ("test_cuda_path.py", "test_resume.py", "test_layouts.py", "test_train.py", "test_prompt_ris.py",
                 "test_reproduce.py", "test_eval.py", "test_clip.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, whatever ran before it: a random input a test draws
    without its own seed is still fixed, and no test's outcome depends on which tests ran first."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """train.main sets process-wide knobs (--threads, flush-denormal); other test files get them back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture(autouse=True, scope="session")
def no_fsync():
    """checkpoints.atomic_write fsyncs each checkpoint and weights file (durability against power loss, which no
    test can cut): 0.1-0.3 s per 46 MB checkpoint on this disk, at every train.main run of the suite. The
    suite's own processes skip it; test_atomic_write_fsyncs_the_file_before_the_rename checks the calls."""
    fsync = os.fsync
    os.fsync = lambda fd: None
    yield
    os.fsync = fsync


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    """A micro built-in dataset (8 training images of 32 x 32 pixels): the data of every train.main run."""
    import synth

    root = str(tmp_path_factory.mktemp("micro_synth"))
    synth.make_synth(root, seed=0, n_train=8, n_val=2, n_testA=1, n_testB=1)
    return root


@pytest.fixture(scope="module")
def one_step_run(micro_root, tmp_path_factory):
    """A finished 1-step micro run, read by several tests; a test that changes it works on a copy (copy_run)."""
    import train
    from helpers import micro_args

    out = tmp_path_factory.mktemp("one_step") / "run"
    train.main(micro_args(micro_root, out, "--max-steps", "1"))
    return out
