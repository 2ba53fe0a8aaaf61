# Lets the tests import the top-level scripts (model.py, common.py, ...) as modules.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # FlexAttention on CPU runs its unfused reference implementation, which is what the tests want
    config.addinivalue_line("filterwarnings", "ignore:flex_attention called without torch.compile:UserWarning")
