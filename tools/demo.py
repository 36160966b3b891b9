"""The main job: run the bundled InfiniteTalk image-to-video workflow in a real ComfyUI and print the video's path.

By default it uses the tiny random-weight models (written once into .cache/demo/models by make_tiny_models.py), so it
runs on a CPU in about a minute and the frames look like noise. ``--models-dir DIR --workflow infinitetalk_i2v`` runs
the same graph on real model files laid out like ComfyUI/models.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import packimport  # noqa: E402
from comfyhost import REPO_ROOT, ComfyServer  # noqa: E402
from workflow_graph import ui_to_api  # noqa: E402

ASSETS = REPO_ROOT / "workflows" / "assets"


def run_workflow(server: ComfyServer, workflow_path: Path, timeout: float = 1800.0) -> Path:
    """Queue a bundled UI workflow through the HTTP API; return the path of the video it saved."""
    for asset in ASSETS.iterdir():
        shutil.copy(asset, server.input_dir / asset.name)
    prompt = ui_to_api(json.loads(workflow_path.read_text()), server.object_info())
    entry = server.run_prompt(prompt, timeout)
    if entry["status"].get("status_str") != "success":
        errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        raise RuntimeError(f"workflow {workflow_path.name} failed: {json.dumps(errors, indent=1)[:4000]}")
    for output in entry["outputs"].values():
        for item in output.get("images", []) + output.get("videos", []):
            if item.get("filename", "").endswith((".mp4", ".webm", ".mov")):
                return server.output_dir / item.get("subfolder", "") / item["filename"]
    raise RuntimeError(f"workflow {workflow_path.name} finished but saved no video: {entry['outputs']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflow", default="infinitetalk_i2v_tiny_demo", help="name of a file in workflows/")
    parser.add_argument("--models-dir", type=Path, help="ComfyUI-style models folder (default: tiny models)")
    args = parser.parse_args()
    workdir = REPO_ROOT / ".cache" / "demo"
    server = ComfyServer(workdir=workdir, models_root=args.models_dir.resolve() if args.models_dir else None)
    if args.models_dir is None:
        packimport.register()
        from make_tiny_models import make_tiny_models

        make_tiny_models(server.models_dir)
    server.start()
    try:
        video = run_workflow(server, REPO_ROOT / "workflows" / f"{args.workflow}.json")
    finally:
        server.stop()
    print(f"video written: {video}")


if __name__ == "__main__":
    main()
