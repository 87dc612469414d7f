import os
import sys

import pytest
import torch

# Tiny models run fastest single-threaded, and a second process (CI runs alone, a developer may not) must not
# oversubscribe the cores.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gen():
    return generator
