"""Bundled workflows: generated files are up to date, and the tiny demo runs end to end through the HTTP API,
writing an mp4 whose frame count matches the (capped) audio and which carries the speech as its soundtrack."""
import json

import av
import pytest

from bundled_workflows import WORKFLOWS_DIR, write_all
from demo import run_workflow
from workflow_graph import ui_to_api

pytestmark = pytest.mark.comfy



def test_committed_workflows_match_their_definitions(comfy_server, tmp_path):
    for fresh in write_all(comfy_server.object_info(), tmp_path):
        committed = WORKFLOWS_DIR / fresh.name
        assert committed.is_file(), f"{committed.name} is missing: run tools/bundled_workflows.py"
        assert json.loads(committed.read_text()) == json.loads(fresh.read_text()), \
            f"{committed.name} is stale: run tools/bundled_workflows.py"


TINY_DEMOS = sorted(WORKFLOWS_DIR.glob("*_tiny_demo.json"))


@pytest.mark.parametrize("workflow", TINY_DEMOS, ids=lambda p: p.stem)
def test_tiny_demo_runs_through_the_http_api(tiny_server, workflow):
    graph = json.loads(workflow.read_text())
    cap = next(n["widgets_values"][1] for n in graph["nodes"] if n["type"] == "MultiTalkWav2VecEmbeds")
    width = next(n["widgets_values"][0] for n in graph["nodes"] if n["type"] == "WanVideoImageToVideoMultiTalk")
    video = run_workflow(tiny_server, workflow)
    with av.open(str(video)) as container:
        frames = sum(1 for _ in container.decode(video=0))
        assert container.streams.video[0].width == width
        assert len(container.streams.audio) == 1
        audio_seconds = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
    assert frames == cap
    assert abs(audio_seconds - frames / 25) < 0.1


def _prompt(nodes: dict) -> dict:
    return {str(i): {"class_type": kind, "inputs": inputs} for i, (kind, inputs) in nodes.items()}


def test_bad_inputs_give_node_errors_and_the_server_keeps_serving(tiny_server):
    missing = _prompt({1: ("WanVideoVAELoader", {"model_name": "no_such_vae.safetensors", "precision": "fp32"}),
                       2: ("WanVideoImageToVideoMultiTalk", {"vae": ["1", 0], "width": 256, "height": 256,
                                                             "frame_window_size": 33, "motion_frame": 9,
                                                             "force_offload": False, "colormatch": "disabled"}),
                       3: ("PreviewAny", {"source": ["2", 1]})})
    response = tiny_server.post_prompt(missing)
    assert response.status_code == 400
    assert "no_such_vae.safetensors" in json.dumps(response.json()["node_errors"])

    wrong_size = json.loads(json.dumps(missing))
    wrong_size["1"]["inputs"]["model_name"] = "wan2.1_vae_tiny.safetensors"
    wrong_size["2"]["inputs"]["width"] = 264
    entry = tiny_server.run_prompt(wrong_size)
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "WanVideoImageToVideoMultiTalk"
    assert "divisible by 16" in error["exception_message"]

    wrong_socket = json.loads(json.dumps(wrong_size))
    wrong_socket["2"]["inputs"]["width"] = 256
    wrong_socket["2"]["inputs"]["vae"] = ["4", 0]
    wrong_socket["4"] = {"class_type": "WanVideoBlockSwap", "inputs": {"blocks_to_swap": 1, "offload_img_emb": False,
                                                                       "offload_txt_emb": False}}
    response = tiny_server.post_prompt(wrong_socket)
    assert response.status_code == 400
    assert "return_type_mismatch" in json.dumps(response.json())

    ok = tiny_server.run_prompt(json.loads(json.dumps(wrong_socket).replace('["4", 0]', '["1", 0]')))
    assert ok["status"]["status_str"] == "success"


@pytest.mark.parametrize("frames", [1, 81, 82, 150, 400])
def test_video_length_equals_the_audio_length(tiny_server, frames):
    """Audio lengths that are not a whole number of windows give exactly that many frames, with the audio muxed."""
    import numpy as np
    import soundfile

    rate = 16000
    t = np.arange(int(np.ceil(frames * rate / 25)) + 1) / rate
    soundfile.write(tiny_server.input_dir / f"tone_{frames}.wav", (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t))), rate)
    workflow = json.loads((WORKFLOWS_DIR / "infinitetalk_i2v_tiny_demo.json").read_text())
    prompt = ui_to_api(workflow, tiny_server.object_info())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadAudio":
            inputs["audio"] = f"tone_{frames}.wav"
        elif node["class_type"] == "MultiTalkWav2VecEmbeds":
            inputs["num_frames"] = 10000
        elif node["class_type"] == "WanVideoImageToVideoMultiTalk":
            inputs.update(width=64, height=64)
        elif node["class_type"] == "WanVideoSampler":
            inputs["steps"] = 1
        elif node["class_type"] == "SaveVideo":
            inputs["filename_prefix"] = f"length/frames_{frames}"
    entry = tiny_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = next(item for output in entry["outputs"].values() for item in output.get("images", []))
    with av.open(str(tiny_server.output_dir / saved["subfolder"] / saved["filename"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == frames
        assert len(container.streams.audio) == 1
