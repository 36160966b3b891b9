"""Start ComfyUI with this pack loaded (models and outputs under .cache/demo) and keep it serving."""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyhost import REPO_ROOT, ComfyServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8188)
    args = parser.parse_args()
    workdir = REPO_ROOT / ".cache" / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    server = ComfyServer(workdir=workdir, port=args.port).start()
    print(f"ComfyUI with the InfiniteTalk nodes is serving at {server.url} (models: {server.models_dir}); "
          "Ctrl-C stops it.", flush=True)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
