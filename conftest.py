# Lets the tests import the top-level scripts (model.py, common.py, ...) as modules.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # FlexAttention on CPU runs its unfused reference implementation, which is what the tests want
    config.addinivalue_line("filterwarnings",
                            "ignore:flex_attention called without torch.compile:UserWarning")
    # torch.compile (inductor) imports a deprecated torch.jit API: nothing of ours
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_sessionstart(session):
    # the tests' models are tiny: one thread is faster than two fighting over small matmuls
    import torch
    torch.set_num_threads(1)
