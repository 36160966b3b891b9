"""/object_info of the real server equals the node-interface contract: names, types, defaults, ranges, choices,
widget order, return types and names."""
import pytest

from node_contract import CONTRACT, MODEL_FILES

pytestmark = pytest.mark.comfy

PACK_MODULE = "custom_nodes.ComfyUI-InfiniteTalk"


@pytest.fixture(scope="module")
def pack_object_info(comfy_server):
    return {name: info for name, info in comfy_server.object_info().items()
            if info["python_module"].startswith(PACK_MODULE)}


def test_every_registered_node_has_a_contract(pack_object_info):
    assert set(pack_object_info) <= set(CONTRACT), set(pack_object_info) - set(CONTRACT)


def test_every_contract_node_is_registered(pack_object_info):
    assert set(CONTRACT) <= set(pack_object_info), set(CONTRACT) - set(pack_object_info)


def _declared_inputs(info: dict) -> list[tuple[str, str, object, dict]]:
    rows = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            rows.append((section, name, spec[0], spec[1] if len(spec) > 1 else {}))
    return rows


def _check_node(name: str, info: dict) -> None:
    display, category, inputs, outputs, output_names = CONTRACT[name]
    assert info["display_name"] == display
    assert info["category"] == category
    assert info["output"] == outputs
    assert info["output_name"] == output_names
    declared = _declared_inputs(info)
    assert [(s, n) for s, n, _, _ in declared] == [(s, n) for s, n, _, _ in inputs]
    for (_, input_name, kind, config), (_, _, want_kind, want_config) in zip(declared, inputs):
        where = f"{name}.{input_name}"
        if want_kind == MODEL_FILES:
            assert isinstance(kind, list), where
        elif isinstance(want_kind, list):
            assert kind == want_kind, where
        else:
            assert kind == want_kind, where
        for key, value in want_config.items():
            if key == "default" and want_kind == MODEL_FILES:
                assert kind[0] == value, where
            else:
                assert config.get(key) == value, (where, key, config.get(key), value)
        if kind not in ("INT", "FLOAT", "STRING", "BOOLEAN") and not isinstance(kind, list):
            continue
        assert config.get("tooltip"), f"{where} has no tooltip"


def test_registered_nodes_match_the_contract(pack_object_info):
    assert pack_object_info
    for name, info in pack_object_info.items():
        _check_node(name, info)
