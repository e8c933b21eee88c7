import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, whatever ran before it: a random input a test draws
    without its own seed is still fixed, and no test's outcome depends on which tests ran first."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
