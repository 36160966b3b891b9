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


@pytest.fixture(scope="module")
def tiny_server(comfy_server):
    """The session's ComfyUI server with the tiny models and the bundled workflow assets in place."""
    from bundled_workflows import WORKFLOWS_DIR
    from make_tiny_models import make_tiny_models

    make_tiny_models(comfy_server.models_dir)
    for asset in (WORKFLOWS_DIR / "assets").iterdir():
        (comfy_server.input_dir / asset.name).write_bytes(asset.read_bytes())
    return comfy_server


@pytest.fixture(scope="module")
def loop_model_files(fixtures_dir, tmp_path_factory):
    """(folder with infinitetalk.safetensors and vae.safetensors from the 1-speaker and VAE fixtures, text_len)."""
    import json

    from parity import tensor_group
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("models")
    ref = fixtures_dir / "ref_tiny_1p.safetensors"
    text_len = json.loads(safe_open(str(ref), "pt").metadata()["harness"])["config"]["text_len"]
    save_file(tensor_group(load_file(str(ref)), "state_dict"), str(folder / "infinitetalk.safetensors"))
    vae_sd = tensor_group(load_file(str(fixtures_dir / "ref_vae_a.safetensors")), "state_dict")
    save_file(vae_sd, str(folder / "vae.safetensors"))
    return folder, text_len
