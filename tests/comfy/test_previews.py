"""Latent previews reach the UI: with ``--preview-method auto`` the sampler sends one preview image per step over the
websocket (ComfyUI's binary PREVIEW_IMAGE frames) while the sampler node runs; without a preview method it sends
none."""
import io
import json
import struct

import pytest
from PIL import Image

from bundled_workflows import WORKFLOWS_DIR
from comfyhost import ComfyServer
from make_tiny_models import make_tiny_models
from workflow_graph import ui_to_api

pytestmark = pytest.mark.comfy

PREVIEW_IMAGE = 1  # server.BinaryEventTypes.PREVIEW_IMAGE
JPEG = 1  # image type word of a PREVIEW_IMAGE payload
STEPS, WIDTH, HEIGHT = 2, 80, 64


def _start(workdir, extra_args=()) -> ComfyServer:
    server = ComfyServer(workdir=workdir, extra_args=tuple(extra_args))
    make_tiny_models(server.models_dir)
    server.start()
    for asset in (WORKFLOWS_DIR / "assets").iterdir():
        (server.input_dir / asset.name).write_bytes(asset.read_bytes())
    return server


@pytest.fixture(scope="module")
def preview_server(tmp_path_factory):
    server = _start(tmp_path_factory.mktemp("comfy_previews"), ("--preview-method", "auto"))
    yield server
    server.stop()


def _prompt(server: ComfyServer) -> tuple[dict, str]:
    """The tiny I2V demo, one WIDTH x HEIGHT window of STEPS steps; returns (prompt, sampler node id)."""
    prompt = ui_to_api(json.loads((WORKFLOWS_DIR / "infinitetalk_i2v_tiny_demo.json").read_text()),
                       server.object_info())
    for node in prompt.values():
        if node["class_type"] == "MultiTalkWav2VecEmbeds":
            node["inputs"]["num_frames"] = 9
        elif node["class_type"] == "WanVideoImageToVideoMultiTalk":
            node["inputs"].update(width=WIDTH, height=HEIGHT)
        elif node["class_type"] == "WanVideoSampler":
            node["inputs"]["steps"] = STEPS
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "WanVideoSampler")
    return prompt, sampler


def _run(server: ComfyServer) -> tuple[list, str]:
    prompt, sampler = _prompt(server)
    entry, messages = server.run_prompt_ws(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    return messages, sampler


def _executing(messages: list, node) -> int:
    return next(i for i, m in enumerate(messages)
                if isinstance(m, dict) and m["type"] == "executing" and m["data"].get("node") == node)


def test_sampler_sends_a_preview_image_per_step_while_it_runs(preview_server):
    messages, sampler = _run(preview_server)
    start = _executing(messages, sampler)
    end = next(i for i in range(start + 1, len(messages))
               if isinstance(messages[i], dict) and messages[i]["type"] == "executing")
    previews = [(i, m) for i, m in enumerate(messages) if isinstance(m, bytes)]
    assert len(previews) == STEPS, f"{len(previews)} binary frames for {STEPS} steps"
    for index, frame in previews:
        assert start < index < end, "a preview arrived outside the sampler's execution"
        event, image_type = struct.unpack(">II", frame[:8])
        assert (event, image_type) == (PREVIEW_IMAGE, JPEG)
        image = Image.open(io.BytesIO(frame[8:]))
        assert image.format == "JPEG"
        assert abs(image.width / image.height - WIDTH / HEIGHT) < 0.01  # the latent grid, scaled to the preview size
        assert any(low < high for low, high in image.convert("RGB").getextrema())  # not one flat colour
    progress = [m["data"] for m in messages[start:end] if isinstance(m, dict) and m["type"] == "progress"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == STEPS


def test_no_previews_without_a_preview_method(tmp_path):
    server = _start(tmp_path / "host")
    try:
        messages, _ = _run(server)
    finally:
        server.stop()
    assert not [m for m in messages if isinstance(m, bytes)]
    assert any(isinstance(m, dict) and m["type"] == "progress" for m in messages)
