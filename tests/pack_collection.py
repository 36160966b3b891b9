"""pytest plugin: collect the pack's root folder as a plain directory, not as a Python package.

The root holds ComfyUI's entry ``__init__.py``, which imports ComfyUI modules; pytest would import it to run
package-level fixtures. The core is imported as ``infinitetalk`` instead (see tools/packimport.py).
"""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collect_directory(path, parent):
    if Path(path) == REPO_ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
