"""The real ComfyUI front-end, in headless Chromium, knows every node of this pack and renders them."""
import pytest

from browser import comfy_page

pytestmark = pytest.mark.browser


def test_frontend_lists_pack_nodes_and_renders_a_canvas(comfy_server, tmp_path):
    pack_nodes = {name for name, info in comfy_server.object_info().items()
                  if info["python_module"].startswith("custom_nodes.ComfyUI-InfiniteTalk")}
    with comfy_page(comfy_server) as page:
        assert pack_nodes <= set(page.registered_node_types())
        page.page.evaluate("""() => {
            const node = LiteGraph.createNode('WanVideoBlockSwap');
            node.pos = [200, 200];
            app.graph.add(node);
        }""")
        widgets = page.page.evaluate(
            "Object.fromEntries(app.graph.nodes.find(n => n.type === 'WanVideoBlockSwap')"
            ".widgets.map(w => [w.name, w.value]))")
        shot = page.screenshot(tmp_path / "frontend.png")
    assert widgets["blocks_to_swap"] == 20
    assert widgets["offload_img_emb"] is False
    assert shot.stat().st_size > 10_000
