"""Workflows in the real front-end (headless Chromium): the upstream InfiniteTalk examples load with no missing node
of this pack and their saved widget values map onto our widgets; the bundled tiny demo converts exactly like the
HTTP-API path and runs to execution_success."""
import json
from pathlib import Path

import pytest

from browser import comfy_page
from bundled_workflows import WORKFLOWS_DIR
from conftest import shared_dir
from make_tiny_models import make_tiny_models
from workflow_graph import ui_to_api, widget_names

pytestmark = pytest.mark.browser

OTHER_PACKS = {"VHS_VideoCombine", "VHS_LoadVideo", "INTConstant", "ImageResizeKJv2", "GetImageSizeAndCount",
               "GetImageRangeFromBatch", "ImageConcatMulti", "SetNode", "GetNode", "MelBandRoFormerModelLoader",
               "MelBandRoFormerSampler"}
MODEL_FILE_INPUTS = {"model", "model_name", "lora", "clip_name"}


def _upstream_workflows() -> list[Path]:
    return sorted((shared_dir() / "workflows-upstream").glob("*.json"))


def _check_widget(node: str, name: str, value, spec: list) -> None:
    kind, config = spec[0], (spec[1] if len(spec) > 1 else {})
    where = f"{node}.{name}={value!r}"
    if isinstance(kind, list):
        assert name in MODEL_FILE_INPUTS or value in kind, where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert config.get("min", value) <= value <= config.get("max", value), where
    elif kind == "STRING":
        assert isinstance(value, str), where


@pytest.mark.parametrize("path", _upstream_workflows(), ids=lambda p: p.stem)
def test_upstream_workflow_loads_and_widgets_map(comfy_server, path, tmp_path):
    object_info = comfy_server.object_info()
    workflow = json.loads(path.read_text())
    with comfy_page(comfy_server) as page:
        page.load_workflow(workflow)
        missing = set(page.missing_node_types())
        page.screenshot(tmp_path / f"{path.stem}.png")
    assert missing <= OTHER_PACKS, f"node types not provided: {sorted(missing - OTHER_PACKS)}"
    ours = [n for n in workflow["nodes"] if n["type"] in object_info and
            object_info[n["type"]]["python_module"].startswith("custom_nodes.ComfyUI-InfiniteTalk")]
    assert len(ours) >= 10
    for node in ours:
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in widget_names(info):
            if not values:
                break
            _check_widget(node["type"], name, values.pop(0), specs[name])
            if name == "seed":
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"{node['type']} has {len(values)} saved widget values more than it has widgets"


@pytest.mark.parametrize("path", sorted(WORKFLOWS_DIR.glob("*_tiny_demo.json")), ids=lambda p: p.stem)
def test_tiny_demo_converts_like_the_api_path_and_runs(comfy_server, tmp_path, path):
    make_tiny_models(comfy_server.models_dir)
    for asset in (WORKFLOWS_DIR / "assets").iterdir():
        (comfy_server.input_dir / asset.name).write_bytes(asset.read_bytes())
    workflow = json.loads(path.read_text())
    expected = ui_to_api(workflow, comfy_server.object_info())
    with comfy_page(comfy_server) as page:
        page.load_workflow(workflow)
        assert page.missing_node_types() == []
        converted = page.graph_to_prompt()
        for node_id, node in expected.items():
            got = converted[node_id]
            assert got["class_type"] == node["class_type"]
            assert {k: v for k, v in got["inputs"].items() if k in node["inputs"]} == node["inputs"], node_id
        page.page.evaluate("""() => {
            const sampler = app.graph.nodes.find(n => n.type === 'WanVideoSampler');
            sampler.widgets.find(w => w.name === 'seed').value = 7;
        }""")
        page.queue()
        event = page.wait_finished(timeout_s=900)
        page.screenshot(tmp_path / "tiny_demo.png")
    assert event["type"] == "execution_success", event["detail"].get("exception_message", event)
