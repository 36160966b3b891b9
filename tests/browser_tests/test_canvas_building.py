"""Users build graphs by hand: every node of the pack is found in the node search box under its display name and
category, lands on an empty canvas with its default widget values and tooltips, and a small InfiniteTalk graph made
only of nodes added this way, wired in the page, runs on the tiny models."""
import pytest

from browser import comfy_page
from bundled_workflows import WORKFLOWS_DIR
from make_tiny_models import make_tiny_models

pytestmark = pytest.mark.browser
PACK = "custom_nodes.ComfyUI-InfiniteTalk"


def _defaults(info: dict) -> dict:
    values = {}
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            config = spec[1] if len(spec) > 1 else {}
            if "default" in config and (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")):
                values[name] = config["default"]
    return values


def test_every_pack_node_can_be_added_from_the_search_box(comfy_server):
    object_info = comfy_server.object_info()
    ours = {name: info for name, info in object_info.items() if info["python_module"].startswith(PACK)}
    with comfy_page(comfy_server) as page:
        page.page.evaluate("app.graph.clear()")
        for name, info in sorted(ours.items()):
            added = page.add_node_from_search(info["display_name"])
            assert added["type"] == name, (info["display_name"], added)
            assert added["hit"].startswith(info["display_name"])
            assert info["category"].split("/")[0] in added["hit"]
            widgets = page.page.evaluate("id => Object.fromEntries((app.graph.getNodeById(id).widgets || [])"
                                         ".map(w => [w.name, w.value]))", added["id"])
            for widget, default in _defaults(info).items():
                assert widgets[widget] == pytest.approx(default), (name, widget)
            if widgets:
                first = next(iter(widgets))
                section = "required" if first in info["input"].get("required", {}) else "optional"
                assert page.widget_tooltip(added["id"]) == info["input"][section][first][1]["tooltip"]


GRAPH = {
    "adapter": ("Multi/InfiniteTalk Model Loader", {"model": "infinitetalk_tiny/infinitetalk_single_tiny.safetensors"}),
    "model": ("WanVideo Model Loader", {"model": "infinitetalk_tiny/wan2.1_i2v_tiny.safetensors",
                                        "base_precision": "fp32"}),
    "vae": ("WanVideo VAE Loader", {"model_name": "wan2.1_vae_tiny.safetensors", "precision": "fp32"}),
    "text": ("WanVideo TextEncode Cached", {"model_name": "umt5_tiny.safetensors", "precision": "fp32",
                                            "positive_prompt": "a person talking", "use_disk_cache": False}),
    "image": ("Load Image", {"image": "sample_portrait.png"}),
    "audio": ("Load Audio", {"audio": "sample_speech.mp3"}),
    "wav2vec": ("Wav2vec2 Model Loader", {"model": "wav2vec2_tiny.safetensors", "base_precision": "fp32"}),
    "embeds": ("Multi/InfiniteTalk Wav2vec2 Embeds", {"num_frames": 25}),
    "i2v": ("WanVideo Long I2V Multi/InfiniteTalk", {"width": 128, "height": 128, "frame_window_size": 25,
                                                     "motion_frame": 5}),
    "sampler": ("WanVideo Sampler", {"steps": 2, "cfg": 1.0, "scheduler": "multitalk"}),
    "frames": ("WanVideo Pass Images From Samples", {}),
    "video": ("Create Video", {"fps": 25.0}),
    "save": ("Save Video", {}),
}
LINKS = [("adapter", "model", "model", "multitalk_model"), ("vae", "vae", "i2v", "vae"),
         ("image", "IMAGE", "i2v", "start_image"), ("wav2vec", "wav2vec_model", "embeds", "wav2vec_model"),
         ("audio", "AUDIO", "embeds", "audio_1"), ("model", "model", "sampler", "model"),
         ("i2v", "image_embeds", "sampler", "image_embeds"), ("text", "text_embeds", "sampler", "text_embeds"),
         ("embeds", "multitalk_embeds", "sampler", "multitalk_embeds"), ("sampler", "samples", "frames", "samples"),
         ("frames", "images", "video", "images"), ("embeds", "audio", "video", "audio"), ("video", "VIDEO", "save", "video")]


def test_hand_built_graph_runs(comfy_server, tmp_path):
    make_tiny_models(comfy_server.models_dir)
    for asset in (WORKFLOWS_DIR / "assets").iterdir():
        (comfy_server.input_dir / asset.name).write_bytes(asset.read_bytes())
    with comfy_page(comfy_server) as page:
        page.page.evaluate("app.graph.clear()")
        ids = {}
        for key, (display, widgets) in GRAPH.items():
            ids[key] = page.add_node_from_search(display)["id"]
            page.page.evaluate("""([id, values]) => { const n = app.graph.getNodeById(id);
                for (const [name, value] of Object.entries(values)) n.widgets.find(w => w.name === name).value = value;
            }""", [ids[key], widgets])
        for source, output, target, input_name in LINKS:
            linked = page.page.evaluate("""([a, out, b, inp]) => { const s = app.graph.getNodeById(a);
                const t = app.graph.getNodeById(b);
                return !!s.connect(s.findOutputSlot(out), t, t.findInputSlot(inp)); }""",
                                        [ids[source], output, ids[target], input_name])
            assert linked, (source, output, target, input_name)
        page.queue()
        event = page.wait_finished(timeout_s=900)
        page.screenshot(tmp_path / "hand_built.png")
    assert event["type"] == "execution_success", event["detail"].get("exception_message", event)
