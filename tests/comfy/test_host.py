"""The pack loads in a real ComfyUI server, under any folder name, and a broken pack fails loudly."""
import ast
import shutil

import pytest

from comfyhost import REPO_ROOT, ComfyServer, ComfyStartError

pytestmark = pytest.mark.comfy


def _pack_nodes(object_info: dict) -> dict:
    return {name: info for name, info in object_info.items()
            if info.get("python_module", "").startswith("custom_nodes.ComfyUI-InfiniteTalk")}


def test_pack_imports_without_error(comfy_server):
    log = comfy_server.log()
    assert "ComfyUI-InfiniteTalk" in log, log
    assert "IMPORT FAILED" not in log, log


def _registered_mappings() -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS keys and NODE_DISPLAY_NAME_MAPPINGS of nodes.py, read from its source."""
    tree = ast.parse((REPO_ROOT / "nodes.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            target = node.targets[0].id
            found[target] = {ast.literal_eval(k): v for k, v in zip(node.value.keys, node.value.values)}
    names = found["NODE_DISPLAY_NAME_MAPPINGS"]
    return found["NODE_CLASS_MAPPINGS"], {k: ast.literal_eval(v) for k, v in names.items()}


def test_every_registered_node_is_listed_under_the_wanvideowrapper_category(comfy_server):
    classes, display_names = _registered_mappings()
    listed = _pack_nodes(comfy_server.object_info())
    assert set(listed) == set(classes)
    for name, info in listed.items():
        assert info["category"].split("/")[0] == "WanVideoWrapper", (name, info["category"])
        assert info["display_name"] == display_names[name]


def test_broken_init_fails_with_traceback(tmp_path):
    scratch = tmp_path / "pack"
    shutil.copytree(REPO_ROOT, scratch, ignore=shutil.ignore_patterns(".cache", ".git", "__pycache__", "tests"))
    init = scratch / "__init__.py"
    init.write_text("import a_module_that_does_not_exist_xyz\n" + init.read_text())
    server = ComfyServer(workdir=tmp_path / "host", pack_dir=scratch, pack_name="broken-pack")
    with pytest.raises(ComfyStartError) as excinfo:
        server.start()
    server.stop()
    assert "a_module_that_does_not_exist_xyz" in str(excinfo.value)
    assert "Traceback" in str(excinfo.value)
