"""Build UI-format ComfyUI workflows from Python, and convert simple UI workflows to API prompts.

Both directions use a server's ``/object_info`` for widget order: widgets are the INT/FLOAT/STRING/BOOLEAN/COMBO
inputs in declaration order (required, then optional); the front-end adds ``control_after_generate`` after an input
named ``seed`` / ``noise_seed``. The converter handles what the bundled workflows use (links, widgets, muted nodes,
UI-only notes); the browser's ``app.graphToPrompt`` remains the reference for arbitrary graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
UI_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
FRONTEND_EXTRA_WIDGETS = {"LoadImage": ["image"], "LoadAudio": [None, None]}


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    config = spec[1] if len(spec) > 1 else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not config.get("forceInput", False)


def widget_names(info: dict) -> list[str]:
    """Widget input names of one node in saved ``widgets_values`` order (without front-end extras)."""
    names = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            if _is_widget(info["input"][section][name]):
                names.append(name)
    return names


def socket_inputs(info: dict) -> list[tuple[str, str]]:
    """(name, type) of the link-only inputs of one node, in declaration order."""
    sockets = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            if not _is_widget(spec):
                sockets.append((name, spec[0]))
    return sockets


@dataclass
class Node:
    id: int
    type: str
    widgets: dict
    pos: tuple[int, int]
    title: Optional[str] = None
    text: Optional[str] = None


@dataclass
class Graph:
    """A workflow under construction: add nodes, link outputs to inputs by name, then ``to_ui(object_info)``."""

    nodes: list[Node] = field(default_factory=list)
    links: list[tuple[int, int, int, int, str]] = field(default_factory=list)

    def add(self, node_type: str, pos: tuple[int, int], title: Optional[str] = None, **widgets) -> Node:
        node = Node(len(self.nodes) + 1, node_type, widgets, pos, title)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos: tuple[int, int], title: str = "Read me") -> Node:
        node = self.add("MarkdownNote", pos, title)
        node.text = text
        return node

    def link(self, source: Node, output: int, target: Node, input_name: str) -> None:
        self.links.append((source.id, output, target.id, input_name, ""))

    def to_ui(self, object_info: dict) -> dict:
        """The UI-format (version 0.4) workflow."""
        link_rows, inputs_of, outputs_of = [], {}, {}
        for number, (src, slot, dst, name, _) in enumerate(self.links, start=1):
            src_type = object_info[self._node(src).type]["output"][slot]
            link_rows.append([number, src, slot, dst, name, src_type])
            outputs_of.setdefault((src, slot), []).append(number)
            inputs_of[(dst, name)] = number
        nodes = [self._ui_node(node, object_info, inputs_of, outputs_of) for node in self.nodes]
        for row in link_rows:
            sockets = [s["name"] for s in nodes[row[3] - 1]["inputs"]]
            row[4] = sockets.index(row[4])
        return {"id": "00000000-0000-4000-8000-000000000001", "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(link_rows), "nodes": nodes, "links": link_rows, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4}

    def _node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    def _ui_node(self, node: Node, object_info: dict, inputs_of: dict, outputs_of: dict) -> dict:
        base = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": [360, 120], "flags": {},
                "order": node.id - 1, "mode": 0, "properties": {"Node name for S&R": node.type}}
        if node.title:
            base["title"] = node.title
        if node.type in UI_ONLY:
            return {**base, "size": [420, 300], "inputs": [], "outputs": [], "widgets_values": [node.text]}
        info = object_info[node.type]
        unknown = set(node.widgets) - set(widget_names(info))
        if unknown:
            raise KeyError(f"{node.type} has no widget(s) {sorted(unknown)}")
        values = []
        for name in widget_names(info):
            values.append(node.widgets[name] if name in node.widgets else _default(info, name))
            if name in SEED_NAMES:
                values.append("fixed")
        values += FRONTEND_EXTRA_WIDGETS.get(node.type, [])
        inputs = [{"name": name, "type": kind, "link": inputs_of.get((node.id, name))}
                  for name, kind in socket_inputs(info)]
        outputs = [{"name": name, "type": kind, "links": outputs_of.get((node.id, slot), [])}
                   for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        return {**base, "inputs": inputs, "outputs": outputs, "widgets_values": values}


def _default(info: dict, name: str) -> Any:
    for section in ("required", "optional"):
        spec = info["input"].get(section, {}).get(name)
        if spec is not None:
            config = spec[1] if len(spec) > 1 else {}
            if "default" in config:
                return config["default"]
            if isinstance(spec[0], list) and spec[0]:
                return spec[0][0]
    raise KeyError(f"{info['name']}.{name} has no default; give a value")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API prompt of a UI workflow made of real nodes, links and notes (no Set/Get, no subgraphs)."""
    links = {row[0]: row for row in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name in widget_names(info):
            if not values:
                break
            inputs[name] = values.pop(0)
            if name in SEED_NAMES and values:
                values.pop(0)
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                row = links[socket["link"]]
                inputs[socket["name"]] = [str(row[1]), row[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
