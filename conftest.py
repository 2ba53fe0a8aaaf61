# Lets the tests import the top-level scripts (model.py, common.py, ...) as modules.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
