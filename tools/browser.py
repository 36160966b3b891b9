"""Drive the real ComfyUI front-end in headless Chromium (Debian's chromium through Python playwright).

``ComfyPage`` opens the page of a running :class:`comfyhost.ComfyServer`, loads UI-format workflows with
``app.loadGraphData``, lists node types the front-end does not know, converts with ``app.graphToPrompt``, queues,
waits for ``execution_success`` and takes screenshots.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]

_RECORD_EVENTS = """() => {
  window.__events = [];
  for (const type of ['execution_start', 'executed', 'execution_success', 'execution_error',
                      'execution_interrupted', 'execution_cached']) {
    app.api.addEventListener(type, e => window.__events.push({type, detail: e.detail}));
  }
}"""


def chromium_executable() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("Debian chromium is not installed: run `bash tools/setup_host.sh --browser`")
    return path


class ComfyPage:
    """One browser page on the ComfyUI front-end."""

    def __init__(self, page, base_url: str):
        self.page = page
        self.base_url = base_url

    def open(self) -> "ComfyPage":
        self.page.goto(self.base_url + "/", wait_until="domcontentloaded")
        self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph && window.app.api",
                                    timeout=120_000)
        self.page.evaluate(_RECORD_EVENTS)
        return self

    def load_workflow(self, workflow: dict) -> None:
        self.page.evaluate("async wf => await app.loadGraphData(wf, true, true, 'test', "
                           "{showMissingNodesDialog: false, showMissingModelsDialog: false})", workflow)

    def missing_node_types(self) -> list[str]:
        return self.page.evaluate(
            "[...new Set(app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type))]")

    def registered_node_types(self) -> list[str]:
        return self.page.evaluate("Object.keys(LiteGraph.registered_node_types)")

    def graph_to_prompt(self) -> dict:
        return json.loads(self.page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).output)"))

    def serialized_graph(self) -> dict:
        return json.loads(self.page.evaluate("JSON.stringify(app.graph.serialize())"))

    def queue(self) -> None:
        self.page.evaluate("async () => await app.queuePrompt(0, 1)")

    def wait_finished(self, timeout_s: float = 900.0) -> dict:
        """Wait for execution_success or execution_error; return that event."""
        self.page.wait_for_function(
            "window.__events.some(e => ['execution_success', 'execution_error'].includes(e.type))",
            timeout=timeout_s * 1000)
        events = self.page.evaluate("window.__events")
        return next(e for e in events if e["type"] in ("execution_success", "execution_error"))

    def add_node_from_search(self, display_name: str) -> dict:
        """Double-click an empty spot of the canvas, type ``display_name`` in the node search box, click the result
        with exactly that name; returns ``{"hit": its text, "type": added node type, "id": node id}`` and moves the
        new node out of the way so the spot stays empty."""
        box = self.page.locator("#graph-canvas").bounding_box()
        before = self.page.evaluate("app.graph.nodes.map(n => n.id)")
        self.page.evaluate("app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true)")
        for attempt in range(3):
            self.page.wait_for_timeout(200)
            self.page.mouse.dblclick(box["x"] + 250, box["y"] + box["height"] / 2)
            try:
                self.page.wait_for_selector("input[placeholder='Search Nodes...']", state="visible", timeout=5_000)
                break
            except PlaywrightTimeout:
                self.page.keyboard.press("Escape")
        else:
            raise AssertionError("double-clicking the empty canvas did not open the node search box")
        self.page.wait_for_timeout(200)
        search = self.page.get_by_placeholder("Search Nodes...")
        search.fill(display_name)
        first_hit = """name => {
            const hit = [...document.querySelectorAll('li[role=option]')].find(e => e.innerText.trim());
            return !!hit && hit.innerText.split('\\n')[0].replace('\\u00a0', '').trim() === name;
        }"""
        self.page.wait_for_function(first_hit, arg=display_name, timeout=15_000)
        self.page.wait_for_timeout(300)
        hit = self.page.evaluate(f"""name => {{
            if (!({first_hit})(name)) return null;
            const hit = [...document.querySelectorAll('li[role=option]')].find(e => e.innerText.trim());
            hit.click();
            return hit.innerText;
        }}""", display_name)
        if hit is None:
            raise AssertionError(f"the search results for {display_name!r} changed while choosing one")
        self.page.wait_for_function("n => app.graph.nodes.length > n", arg=len(before), timeout=15_000)
        self.page.wait_for_selector("input[placeholder='Search Nodes...']", state="hidden", timeout=15_000)
        added = self.page.evaluate("""before => {
            const node = app.graph.nodes.find(n => !before.includes(n.id));
            node.pos = [2000 + 40 * (node.id % 20), 100 + 30 * (node.id % 20)];
            return {type: node.type, id: node.id};
        }""", before)
        return {"hit": hit, **added}

    def widget_tooltip(self, node_id: int, index: int = 0) -> str:
        """Hover widget ``index`` of node ``node_id`` and return the tooltip text the front-end shows."""
        self.page.evaluate("id => { app.graph.getNodeById(id).pos = [400, 150]; app.canvas.setDirty(true, true); }",
                           node_id)
        self.page.wait_for_timeout(300)
        point = self.page.evaluate("""([id, i]) => { const n = app.graph.getNodeById(id); const w = n.widgets[i];
            return app.canvasPosToClientPos([n.pos[0] + 40, n.pos[1] + w.y + 8]); }""", [node_id, index])
        self.page.mouse.move(point[0] - 5, point[1])
        self.page.mouse.move(point[0], point[1])
        self.page.wait_for_selector(".node-tooltip", timeout=10_000)
        text = self.page.inner_text(".node-tooltip")
        self.page.mouse.move(5, 5)
        self.page.evaluate("id => { app.graph.getNodeById(id).pos = [2000, 100]; }", node_id)
        return text

    def toasts(self) -> list[str]:
        return self.page.evaluate("[...document.querySelectorAll('.p-toast-message')].map(d => d.innerText)")

    def screenshot(self, path: Path) -> Path:
        self.page.screenshot(path=str(path))
        return path


@contextmanager
def comfy_page(server, viewport=(1600, 1000)):
    """Yield an opened :class:`ComfyPage` on ``server``; closes the browser afterwards."""
    from playwright.sync_api import sync_playwright

    server.set_setting("Comfy.TutorialCompleted", True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(), headless=True,
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield ComfyPage(page, server.url).open()
        finally:
            browser.close()
