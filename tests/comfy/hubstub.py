"""A local stand-in for the Hugging Face hub, for download tests without internet.

It answers the routes huggingface_hub's ``snapshot_download`` (2.x) calls, for repositories held in memory:

* ``GET /api/models/{repo}/revision/{rev}``: repo info (``sha`` = the commit, ``siblings``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the recursive file list (``oid``, ``size``; ``lfs`` for weights);
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}``: the file, with ``X-Repo-Commit`` and ``ETag`` (the sha256 for
  LFS-style weight files, the git blob sha1 otherwise) as the hub sends them.

Unknown repositories, revisions and files get 404 with the hub's ``X-Error-Code``. Every request is recorded
(method, path) so a test can check what was fetched. Point ``HF_ENDPOINT`` (or ``endpoint=``) at :attr:`url`.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
REPO = r"(?P<repo>[^/]+/[^/]+)"
INFO_ROUTE = re.compile(rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)")
TREE_ROUTE = re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?")
RESOLVE_ROUTE = re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")


@dataclass(frozen=True)
class HubRepo:
    """One model repository: file name -> bytes, at one commit (40 hex digits derived from the contents)."""

    files: dict[str, bytes]

    @property
    def sha(self) -> str:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(self.files[name]).digest())
        return digest.hexdigest()

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def etag(self, name: str) -> str:
        data = self.files[name]
        if self.is_lfs(name):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def tree_entry(self, name: str) -> dict:
        data = self.files[name]
        entry = {"type": "file", "path": name, "size": len(data),
                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if self.is_lfs(name):
            entry["lfs"] = {"oid": self.etag(name), "size": len(data), "pointerSize": 134}
        return entry


def _handler(stub: "HubStub") -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            return

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            self._answer(head=False)

        def _answer(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            stub.requests.append((self.command, path))
            for route, method in ((INFO_ROUTE, self._info), (TREE_ROUTE, self._tree), (RESOLVE_ROUTE, self._file)):
                match = route.fullmatch(path)
                if match:
                    repo = stub.repos.get(match["repo"])
                    if repo is None:
                        return self._error("RepoNotFound", f"Repository {match['repo']} not found", head)
                    if match["rev"] not in ("main", repo.sha):
                        return self._error("RevisionNotFound", f"Revision {match['rev']} not found", head)
                    return method(repo, match, head)
            return self._error("EntryNotFound", f"no route for {path}", head)

        def _info(self, repo: HubRepo, match, head: bool) -> None:
            body = {"id": match["repo"], "modelId": match["repo"], "sha": repo.sha, "private": False,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

        def _tree(self, repo: HubRepo, match, head: bool) -> None:
            prefix = (match["path"] or "").strip("/")
            names = [n for n in sorted(repo.files) if not prefix or n.startswith(prefix + "/")]
            body = json.dumps([repo.tree_entry(n) for n in names]).encode()
            self._send(200, body, {"Content-Type": "application/json"}, head)

        def _file(self, repo: HubRepo, match, head: bool) -> None:
            name = match["path"]
            if name not in repo.files:
                return self._error("EntryNotFound", f"{name} does not exist", head, {"X-Repo-Commit": repo.sha})
            headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": repo.sha,
                       "ETag": f'"{repo.etag(name)}"'}
            self._send(200, repo.files[name], headers, head)

        def _error(self, code: str, message: str, head: bool, extra: dict | None = None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
            self._send(404, json.dumps({"error": message}).encode(), {**headers, **(extra or {})}, head)

        def _send(self, status: int, body: bytes, headers: dict, head: bool) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


@dataclass
class HubStub:
    """The stand-in hub on 127.0.0.1: ``repos`` maps "org/name" -> :class:`HubRepo`."""

    repos: dict[str, HubRepo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HubStub":
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    @contextmanager
    def unreachable(self):
        """Inside the block nothing listens on :attr:`url` (connections are refused); the hub comes back after."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def fetched(self, repo: str) -> set[str]:
        """Files of ``repo`` whose content was sent (GET on the resolve route)."""
        prefix = f"/{repo}/resolve/"
        return {path[len(prefix):].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and path.startswith(prefix)}
