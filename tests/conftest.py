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


# pytest -n (--dist loadgroup): a test module runs whole in one worker, so its module fixtures are built once;
# the modules whose oracles import transformers (~5 s of CPU per process) share one worker.
TRANSFORMERS_ORACLES = ("test_clip.py", "test_load_weights.py", "test_sam.py", "test_tokenizer.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("transformers" if name in TRANSFORMERS_ORACLES else name))


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
    """train.atomic_write fsyncs each checkpoint and weights file (durability against power loss, which no
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
