"""Import this pack's core modules as the package ``infinitetalk`` without running its ``__init__.py``.

The pack's ``__init__.py`` registers ComfyUI nodes and so needs ComfyUI; the core (``wanvideo``, ``multitalk``,
``attention``, ``fp8_optimization``, ``blockswap``) must not. Tests, tools and benchmarks call ``register()`` and then
``import infinitetalk.wanvideo.model`` etc.; relative imports inside the pack resolve as they do under ComfyUI.
"""
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_NAME = "infinitetalk"


def register(name: str = PACKAGE_NAME) -> str:
    """Register the pack folder as package ``name`` (idempotent) and return the name."""
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module = importlib.util.module_from_spec(spec)
        module.__path__ = [str(PACK_ROOT)]
        module.__file__ = None
        sys.modules[name] = module
    return name
