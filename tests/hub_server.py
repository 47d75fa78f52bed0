"""A stand-in for the Hugging Face Hub that the suite starts on 127.0.0.1: what mergeng reaches over a
network, reached for real, with no internet.

It speaks the part of the Hub's protocol huggingface_hub 2.4.0 and mergeng use (../shared/reference/hub.md §4):
- `GET /api/models/{id}[/revision/{rev}]`        {"id", "sha", "siblings"}; RepoNotFound / RevisionNotFound
- `GET /api/models/{id}/tree/{rev}[/{path}]`     file entries with size, oid and, for weights, lfs {oid, size}
- `HEAD`/`GET /{id}/resolve/{rev}/{file}`        X-Repo-Commit, ETag; weights answer 302 to a second port (the
                                                 "CDN", another origin), with X-Linked-Etag / X-Linked-Size
- `GET /cdn/{sha256}` on the second port         the blob, with `Range` -> 206 + Content-Range
A repo is a folder frozen at `add_repo` into a commit (its files copied); `move_branch` makes a new commit.
Gated repos answer 401 GatedRepo to any file request without the right bearer token. Faults a test can turn
on: `ignore_range` (200 with the whole body), `wrong_range` (206 with the bytes of another range, and its Content-Range), `drop_after`
(close the connection after that many body bytes of a ranged read past a file's first byte: rows, not headers). Every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

WEIGHT_SUFFIXES = (".safetensors", ".bin")
BIG = 64 << 20  # files past this are not hashed (benchmark shards, sparse 70B-shaped files): their etag stands in


def _stand_in_oid(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.name}:{st.st_size}:{st.st_ino}:{st.st_mtime_ns}".encode()).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    path: Path  # the frozen copy on disk
    size: int
    oid: str  # git blob sha1
    sha256: str | None  # LFS files (weights) only


@dataclass
class Commit:
    sha: str
    files: dict[str, RepoFile]  # repo path -> file


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated: bool = False


def _git_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class FakeHub:
    def __init__(self, root: Path, token: str = "hf_test_token"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, RepoFile] = {}  # sha256 -> file
        self.rate: float | None = None  # bytes per second over all connections (benchmarks)
        self._next_send = 0.0
        self.token = token
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, range)
        self.ignore_range = False
        self.wrong_range = False
        self.drop_after: int | None = None
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.endpoint = ""
        self.cdn = ""

    # -- repos -------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: Path, branch: str = "main", gated: bool = False,
                 skip: tuple[str, ...] = ()) -> str:
        repo = self.repos.setdefault(repo_id, Repo(repo_id, gated=gated))
        repo.gated = repo.gated or gated
        return self._commit(repo, folder, branch, skip)

    def move_branch(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        return self._commit(self.repos[repo_id], folder, branch, ())

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].refs[name] = sha

    def _commit(self, repo: Repo, folder: Path, branch: str, skip: tuple[str, ...]) -> str:
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip
                       and ".mergeng" not in p.parts)
        oids = {p: _git_sha1(p) if p.stat().st_size <= BIG else _stand_in_oid(p) for p in files}
        h = hashlib.sha1(repo.repo_id.encode() + str(len(repo.commits)).encode())
        for p in files:
            h.update(p.relative_to(folder).as_posix().encode() + oids[p].encode())
        sha = h.hexdigest()
        frozen = self.root / "commits" / sha
        copied: dict[str, RepoFile] = {}
        for p in files:
            rel = p.relative_to(folder).as_posix()
            dest = frozen / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)  # a root reused from an earlier server
            if p.stat().st_size > BIG:  # big weights (benchmarks, sparse 70B shapes): a hard link where allowed
                try:
                    os.link(p, dest)
                except OSError:
                    shutil.copyfile(p, dest)
            else:
                shutil.copyfile(p, dest)
            lfs = (_sha256(dest) if dest.stat().st_size <= BIG else hashlib.sha256(oids[p].encode()).hexdigest()) \
                if rel.endswith(WEIGHT_SUFFIXES) else None
            copied[rel] = RepoFile(dest, dest.stat().st_size, oids[p], lfs)
            if lfs:
                self.blobs[lfs] = copied[rel]
        repo.commits[sha] = Commit(sha, copied)
        repo.refs[branch] = sha
        return sha

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, str | None]]:
        with self._lock:
            return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    # -- server ------------------------------------------------------------------------------
    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                hub._reply(self, 404, {}, b"", head=False)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that hung up (a refused or cut read): not news
                pass

        for _ in range(2):
            server = Server(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_port}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_port}"
        return self.endpoint

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def _reply(self, h: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes, head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, head: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._reply(h, status, headers, json.dumps({"error": code}).encode(), head)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        rng = h.headers.get("Range")
        with self._lock:
            self.log.append(("HEAD" if head else "GET", path, rng))
        port = h.server.server_address[1]
        if port == self._servers[1].server_port:
            return self._serve_blob(h, path, rng, head)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(h, parts[2:], head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(h, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        self._reply(h, 404, {}, b"not found", head)

    def _commit_of(self, repo: Repo, rev: str) -> Commit | None:
        sha = repo.refs.get(rev, rev)
        return repo.commits.get(sha)

    def _api(self, h, parts: list[str], head: bool) -> None:
        repo_id = "/".join(parts[:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "RepoNotFound", head)
        rest = parts[2:]
        if not rest or rest[0] == "revision":
            rev = rest[1] if len(rest) > 1 else "main"
            commit = self._commit_of(repo, rev)
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", head)
            body = {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": False, "gated": "auto" if repo.gated else False,
                    "siblings": [{"rfilename": f} for f in sorted(commit.files)]}
            return self._reply(h, 200, {"Content-Type": "application/json"}, json.dumps(body).encode(), head)
        if rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit_of(repo, rest[1])
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", head)
            entries = []
            for name, file in sorted(commit.files.items()):
                entry = {"type": "file", "path": name, "size": file.size, "oid": file.oid}
                if file.sha256:
                    entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": 134}
                entries.append(entry)
            return self._reply(h, 200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), head)
        self._error(h, 404, "EntryNotFound", head)

    def _authorized(self, h) -> bool:
        return h.headers.get("Authorization") == f"Bearer {self.token}"

    def _resolve(self, h, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "RepoNotFound", head)
        commit = self._commit_of(repo, rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head)
        if repo.gated and not self._authorized(h):
            return self._error(h, 401, "GatedRepo", head)
        file = commit.files.get(name)
        if file is None:
            return self._error(h, 404, "EntryNotFound", head, commit.sha)
        if file.sha256:
            headers = {"X-Repo-Commit": commit.sha, "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size),
                       "ETag": f'"{file.oid}"', "Location": f"{self.cdn}/cdn/{file.sha256}"}
            return self._reply(h, 302, headers, b"", head)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{file.oid}"', "Accept-Ranges": "bytes"}
        self._send_file(h, file, h.headers.get("Range"), headers, head)

    def _serve_blob(self, h, path: str, rng: str | None, head: bool) -> None:
        oid = path.rsplit("/", 1)[-1]
        file = self.blobs.get(oid)
        if file is None:
            return self._reply(h, 404, {}, b"no such blob", head)
        self._send_file(h, file, rng, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"}, head)

    def _send_file(self, h, file: RepoFile, rng: str | None, headers: dict, head: bool) -> None:
        """The file, or the asked range of it, read from disk in pieces (at `rate` when set)."""
        start, end, status = 0, file.size - 1, 200
        if rng is not None and not self.ignore_range:
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start, end, status = int(start_s), min(int(end_s) if end_s else file.size - 1, file.size - 1), 206
            if self.wrong_range:  # bytes from one further on, labelled as such
                start, end = start + 1, min(end + 1, file.size - 1)
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{file.size}"}
        length = end - start + 1
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if head:
            return
        cut = self.drop_after if self.drop_after is not None and status == 206 and length > self.drop_after and start > 0 else None
        with open(file.path, "rb") as f:
            f.seek(start)
            sent = 0
            while sent < length:
                piece = f.read(min(1 << 20, length - sent, cut - sent if cut is not None else 1 << 20))
                self._throttle(len(piece))
                h.wfile.write(piece)
                sent += len(piece)
                if cut is not None and sent >= cut:
                    h.wfile.flush()
                    h.connection.shutdown(socket.SHUT_RDWR)
                    h.close_connection = True
                    return

    def _throttle(self, nbytes: int) -> None:
        """One link of `rate` bytes/s shared by every connection."""
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


def serve_forever(root: Path, repos: dict[str, Path], rate: float | None = None) -> None:  # pragma: no cover
    """Serve `repos` until killed; prints the endpoint (benchmarks/bench_hub.py runs it as its own process)."""
    hub = FakeHub(root)
    for repo_id, folder in repos.items():
        hub.add_repo(repo_id, folder)
    hub.rate = rate
    print(hub.start(), flush=True)
    threading.Event().wait()


if __name__ == "__main__":  # python tests/hub_server.py ROOT RATE_BYTES_PER_S org/name=FOLDER ...
    serve_forever(Path(sys.argv[1]), dict(arg.split("=", 1) for arg in sys.argv[3:]), float(sys.argv[2]) or None)
