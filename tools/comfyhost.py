"""A real ComfyUI server for tests: start it with this pack loaded, talk to its HTTP API, stop it by PID.

The ComfyUI tree and its Python come from ``tools/setup_host.sh`` (``.cache/host``), or from ``COMFYUI_PATH`` and
``COMFYUI_PYTHON`` when a developer points the tests at their own ComfyUI checkout.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_FOLDERS = ("diffusion_models", "unet", "vae", "text_encoders", "clip_vision", "loras", "wav2vec2",
                 "transformers")


class ComfyStartError(RuntimeError):
    """The server did not come up, or this pack failed to import; the message holds the server log."""


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", REPO_ROOT / ".cache" / "host" / "ComfyUI"))


def comfyui_python() -> str:
    if "COMFYUI_PYTHON" in os.environ:
        return os.environ["COMFYUI_PYTHON"]
    venv_python = REPO_ROOT / ".cache" / "host" / "venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() and "COMFYUI_PATH" not in os.environ else sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_paths_yaml(path: Path, custom_nodes: Path, models: Path) -> None:
    lines = ["infinitetalk_tests:", f"    base_path: {models}", f"    custom_nodes: {custom_nodes}"]
    lines += [f"    {name}: {name}" for name in MODEL_FOLDERS]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class ComfyServer:
    """One ComfyUI process. ``workdir`` holds its custom_nodes link, models, input/output/temp/user folders.
    ``env``: extra environment variables for the server process (e.g. HF_ENDPOINT), over the test's own."""

    workdir: Path
    pack_dir: Path = REPO_ROOT
    pack_name: str = "ComfyUI-InfiniteTalk"
    port: int = field(default_factory=free_port)
    models_root: Path | None = None
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.models_root or self.workdir / "models"

    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    @property
    def input_dir(self) -> Path:
        return self.workdir / "input"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        custom_nodes = self.workdir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / self.pack_name
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
        for name in ("input", "output", "temp", "user"):
            (self.workdir / name).mkdir(exist_ok=True)
        yaml_path = self.workdir / "extra_model_paths.yaml"
        _write_paths_yaml(yaml_path, custom_nodes, self.models_dir)
        cmd = [comfyui_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-api-nodes", "--extra-model-paths-config", str(yaml_path),
               "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
               "--temp-directory", str(self.workdir / "temp"), "--user-directory", str(self.workdir / "user"),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=log_file, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        self._wait_ready(timeout)
        self._check_pack_imported()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyStartError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/object_info/LoadImage", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise ComfyStartError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()}")

    def _check_pack_imported(self) -> None:
        text = self.log()
        failed = [line for line in text.splitlines()
                  if self.pack_name in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
        if failed:
            self.stop()
            raise ComfyStartError("this pack failed to import in ComfyUI:\n" + text)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)

    def object_info(self, node: str | None = None) -> dict:
        response = requests.get(self.url + "/object_info" + (f"/{node}" if node else ""), timeout=60)
        response.raise_for_status()
        return response.json()

    def post_prompt(self, prompt: dict) -> requests.Response:
        """POST an API-format prompt; returns the raw response (400 carries ComfyUI's node errors)."""
        return requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex},
                             timeout=60)

    def run_prompt(self, prompt: dict, timeout: float = 900.0) -> dict:
        """Queue a prompt and wait for its history entry; raises with ComfyUI's error on rejection or failure."""
        response = self.post_prompt(prompt)
        if response.status_code != 200:
            raise AssertionError(f"prompt rejected ({response.status_code}): {json.dumps(response.json(), indent=1)}")
        return self.wait_history(response.json()["prompt_id"], timeout)

    def wait_history(self, prompt_id: str, timeout: float = 900.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = requests.get(f"{self.url}/history/{prompt_id}", timeout=30).json()
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def free(self, unload_models: bool = True, free_memory: bool = False) -> None:
        """POST /free: ComfyUI unloads its loaded models (and with ``free_memory`` drops its cache) once the worker
        is idle; the second prompt queued after this call is sure to run after it."""
        requests.post(self.url + "/free", json={"unload_models": unload_models, "free_memory": free_memory},
                      timeout=30).raise_for_status()

    def run_prompt_ws(self, prompt: dict, timeout: float = 900.0) -> tuple[dict, list]:
        """Queue a prompt as a websocket client and listen until it has finished. Returns its history entry and
        every message the server sent that client meanwhile, in order: JSON messages as dicts, binary frames
        (previews: a big-endian uint32 event type, then the payload) as bytes."""
        messages, prompt_id = asyncio.run(self._listen(prompt, timeout))
        return self.wait_history(prompt_id, timeout), messages

    async def _listen(self, prompt: dict, timeout: float) -> tuple[list, str]:
        import aiohttp  # ComfyUI's own dependency; only this method needs it

        client_id, messages = uuid.uuid4().hex, []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                async with session.post(self.url + "/prompt",
                                        json={"prompt": prompt, "client_id": client_id}) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise AssertionError(f"prompt rejected ({response.status}): {json.dumps(body, indent=1)}")
                async with asyncio.timeout(timeout):
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.BINARY:
                            messages.append(bytes(message.data))
                            continue
                        data = json.loads(message.data)
                        messages.append(data)
                        if data["type"] == "executing" and data["data"].get("node") is None and \
                                data["data"].get("prompt_id") == body["prompt_id"]:
                            break
        return messages, body["prompt_id"]

    def set_setting(self, key: str, value) -> None:
        requests.post(f"{self.url}/settings/{key}", json=value, timeout=30).raise_for_status()
