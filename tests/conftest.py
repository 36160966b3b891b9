"""Shared pytest set-up: the pack's core is importable as ``infinitetalk``; parity fixtures are located."""
import os
from pathlib import Path

import packimport  # on sys.path through pytest's pythonpath setting
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

packimport.register()


def shared_dir() -> Path:
    """The read-only reference folder (``../shared`` beside the checkout, or $INFINITETALK_SHARED)."""
    return Path(os.environ.get("INFINITETALK_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = shared_dir() / "fixtures"
    if not path.is_dir():
        pytest.fail(f"parity fixtures not found at {path}; set INFINITETALK_SHARED to the shared/ folder")
    return path


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real ComfyUI server with this pack loaded, shared by the whole test session."""
    from comfyhost import ComfyServer

    server = ComfyServer(workdir=tmp_path_factory.mktemp("comfy")).start()
    yield server
    server.stop()


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread (the parity fixtures were made that way; 2 threads move results by ~1e-6)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sampler_file(fixtures_dir):
    """The sampler parity fixture: (tensors, harness metadata)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = fixtures_dir / "ref_sampler_a.safetensors"
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["harness"])
    return load_file(str(path)), meta
