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
