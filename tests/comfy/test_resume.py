"""Through the HTTP API: a MultiTalk-mode run with ``output_path`` that is cancelled mid-way and queued again resumes
in its run folder and ends with the same PNG frames, byte for byte, as an uninterrupted run."""
import json
import time
from pathlib import Path

import pytest
import requests

from bundled_workflows import WORKFLOWS_DIR
from workflow_graph import ui_to_api

pytestmark = pytest.mark.comfy
FRAMES = 29  # windows of 13 frames overlapping by 5: 13 + 8 + 8



def _prompt(server, output_path) -> dict:
    workflow = json.loads((WORKFLOWS_DIR / "infinitetalk_i2v_tiny_demo.json").read_text())
    prompt = ui_to_api(workflow, server.object_info())
    for node in prompt.values():
        if node["class_type"] == "WanVideoImageToVideoMultiTalk":
            node["inputs"].update(width=64, height=64, frame_window_size=13, motion_frame=5, mode="multitalk",
                                  output_path=str(output_path))
        elif node["class_type"] == "MultiTalkWav2VecEmbeds":
            node["inputs"]["num_frames"] = FRAMES
        elif node["class_type"] == "WanVideoSampler":
            node["inputs"]["steps"] = 1
    return prompt


def _frames(root: Path) -> tuple[Path, dict]:
    (folder,) = [p for p in root.iterdir() if p.name.endswith("_multitalk_output")]
    return folder, {p.name: p.read_bytes() for p in sorted(folder.glob("frame_*.png"))}


def _interrupt_after_first_checkpoint(server, root, prompt_id: str) -> None:
    deadline = time.monotonic() + 300
    while not list(root.glob("*_output/resume.safetensors")):
        assert time.monotonic() < deadline, "no window finished within 300 s"
        time.sleep(0.02)
    requests.post(server.url + "/interrupt", timeout=30).raise_for_status()
    server.wait_history(prompt_id)


def test_cancelled_run_resumes_to_the_same_frames(tiny_server, tmp_path):
    straight = tiny_server.run_prompt(_prompt(tiny_server, tmp_path / "straight"))
    assert straight["status"]["status_str"] == "success", straight["status"]
    _, expected = _frames(tmp_path / "straight")
    assert len(expected) == FRAMES

    root = tmp_path / "resumed"
    queued = tiny_server.post_prompt(_prompt(tiny_server, root))
    assert queued.status_code == 200, queued.text
    _interrupt_after_first_checkpoint(tiny_server, root, queued.json()["prompt_id"])
    folder, partial = _frames(root)
    assert 13 <= len(partial) < FRAMES, "the cancel came too late to leave an unfinished run"

    resumed = tiny_server.run_prompt(_prompt(tiny_server, root))
    assert resumed["status"]["status_str"] == "success", resumed["status"]
    assert _frames(root) == (folder, expected)
    assert "resuming at window" in tiny_server.log()
