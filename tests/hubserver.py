"""A fake Hugging Face Hub on 127.0.0.1, so download code is tested against the real protocol offline.

It serves a local directory laid out like the hub's URLs — `<root>/datasets/<owner>/<name>/<path>`
for datasets, `<root>/<owner>/<name>/<path>` for models — through the endpoints `huggingface_hub`
calls: HEAD/GET `/[datasets/]<repo>/resolve/<revision>/<path>` (ETag, X-Repo-Commit,
Content-Length, Range → 206), GET `/api/<type>s/<repo>/tree/<revision>[/<path>]` (file
listing) and GET `/api/<type>s/<repo>[/revision/<revision>]` (repo info with its commit and
files, which `snapshot_download` asks first). Point `huggingface_hub` at it with `HF_ENDPOINT=hub.url` (the `fake_hub` fixture does).

Faults make the failure paths testable: `hub.inject(path, "drop")` sends half of the next GET's
body and closes the connection, `"corrupt"` flips bytes in the middle of the body (size and
ETag still advertise the good file), `"error"` answers 503. Every request is recorded in
`hub.requests` as (method, url path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one revision every repo is at
_PREFIXES = {"datasets/": "dataset", "spaces/": "space", "": "model"}
_RESOLVE = re.compile(r"^/(datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_TREE = re.compile(r"^/api/(datasets|spaces|models)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_INFO = re.compile(r"^/api/(datasets|spaces|models)/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class FakeHub:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str, str | None]] = []
        self._faults: dict[str, list] = {}  # repo file path -> [kind, remaining times or None]
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- content -------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str, repo_type: str = "dataset") -> Path:
        prefix = {"dataset": "datasets/", "space": "spaces/", "model": ""}[repo_type]
        return self.root / f"{prefix}{repo_id}"

    def add_file(self, repo_id: str, path: str, data: bytes, repo_type: str = "dataset") -> Path:
        dest = self.repo_dir(repo_id, repo_type) / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest

    def inject(self, path: str, kind: str, times: int | None = 1) -> None:
        """Make the next `times` GETs of files whose repo path is `path` fail as `kind` (None: always)."""
        assert kind in ("drop", "corrupt", "error"), kind
        with self._lock:
            self._faults[path] = [kind, times]

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of every GET of `path` so far (None for a whole-file GET)."""
        return [rng for method, url, rng in self.requests if method == "GET" and url.endswith("/" + path)]

    def _take_fault(self, path: str) -> str | None:
        with self._lock:
            fault = self._faults.get(path)
            if fault is None:
                return None
            kind, times = fault
            if times is not None:
                fault[1] -= 1
                if fault[1] <= 0:
                    del self._faults[path]
            return kind

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real hub
    fake: FakeHub

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.fake.requests.append((self.command, path, self.headers.get("Range")))
        if m := _RESOLVE.match(path):
            prefix, repo, _revision, file = m.groups()
            self._resolve(self.fake.repo_dir(repo, _PREFIXES[prefix or ""]), file, body)
        elif (m := _TREE.match(path)) and body:
            kind, repo, _revision, sub = m.groups()
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            self._tree(self.fake.repo_dir(repo, kind[:-1]), sub or "", recursive)
        elif (m := _INFO.match(path)) and body:
            kind, repo, _revision = m.groups()
            self._info(self.fake.repo_dir(repo, kind[:-1]), repo)
        else:
            self._send(404, b"", {"X-Error-Code": "RepoNotFound"})

    def _resolve(self, repo_dir: Path, file: str, body: bool) -> None:
        target = repo_dir / file
        if not repo_dir.is_dir():
            return self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if not target.is_file():
            missing = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": COMMIT}
            return self._send(404, b"", missing)
        data = target.read_bytes()
        headers = {"ETag": f'"{_sha256(target)}"', "X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
        if not body:
            return self._send(200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
        fault = self.fake._take_fault(file)
        if fault == "error":
            return self._send(503, b"service unavailable", {"Content-Type": "text/plain"})
        if fault == "corrupt":
            mid = len(data) // 2
            data = data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :]
        status, start, end = 200, 0, len(data)
        if (rng := _RANGE.match(self.headers.get("Range") or "")) is not None:
            start = int(rng.group(1))
            end = int(rng.group(2)) + 1 if rng.group(2) else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        chunk = data[start:end]
        if fault == "drop":
            return self._drop(status, chunk, headers)
        self._send(status, chunk, headers)

    def _drop(self, status: int, chunk: bytes, headers: dict) -> None:
        """Promise the whole body, send half of it, and hang up: a connection lost mid-file."""
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(chunk))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(chunk[: len(chunk) // 2])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _tree(self, repo_dir: Path, sub: str, recursive: bool) -> None:
        base = repo_dir / sub
        if not base.is_dir():
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
        entries = sorted(base.rglob("*") if recursive else base.iterdir())
        listing = [_tree_entry(p, p.relative_to(repo_dir).as_posix()) for p in entries]
        self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})

    def _info(self, repo_dir: Path, repo: str) -> None:
        if not repo_dir.is_dir():
            return self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        files = sorted(p.relative_to(repo_dir).as_posix() for p in repo_dir.rglob("*") if p.is_file())
        info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, data: bytes, headers: dict, head: bool = False) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)


def _tree_entry(path: Path, rel: str) -> dict:
    """One item of the hub's tree listing; every file is presented as an LFS file."""
    if path.is_dir():
        return {"type": "directory", "oid": COMMIT, "path": rel}
    size, sha = path.stat().st_size, _sha256(path)
    oid = hashlib.sha1(f"blob {size}\0".encode() + path.read_bytes()).hexdigest()
    lfs = {"oid": sha, "size": size, "pointerSize": 134}
    return {"type": "file", "oid": oid, "size": size, "path": rel, "lfs": lfs}
