"""The tests import exlbuild as installed (README: `pip install -e ".[test]"`), never from the checkout's root.

`python -m pytest` puts the working directory first on sys.path. From the checkout's root that makes the folder
kernels/ (installed as exlbuild.kernels) importable as a top-level `kernels`, which shadows the `kernels`
distribution that transformers (a test dependency, 5.25 and later) imports: every comparison with transformers
would fail with an ImportError. So the root leaves sys.path before any test module is imported.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
