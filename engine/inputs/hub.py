"""Models named by their Hugging Face Hub repo IDs: resolved to a commit, planned from headers, then
fetched into the HF cache (only the files the merge reads) or streamed by ranged reads.

    "org/name@rev" ─► HubRef ─► open_snapshot: commit + file listing; config/tokenizer files fetched
                                 │  (small: never weights) into the HF cache's snapshots/<commit>/ folder
                                 ├─► read_header(file): the safetensors header by ranged GETs (plan reads no weight)
                                 ├─► fetch(files): the shards the plan reads, into the cache (default)
                                 └─► RemoteFile.read_into: rows by ranged GETs, no local copy (--stream)

A reference is a local folder when that folder exists (engine/inputs/paths.py decides), else a repo ID
as mergekit writes it: `org/name`, `org/name@revision` (a branch, tag or commit). huggingface_hub does
what the Hub's own tools do: the cache layout and its sharing with transformers, tokens (`HF_TOKEN`, the
stored login), `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE`; mergeng reads those settings when a run starts,
not when huggingface_hub is imported, and `HF_HUB_OFFLINE=1` resolves from the cache alone.

Invariants:
- Before the plan is made, nothing but config/tokenizer-sized files and safetensors headers is fetched.
- Every ranged response is checked (206, the exact `Content-Range`, the length): a server that answers
  with the whole file or other bytes is an error, never a wrong merge.
- A run is pinned to commits: `pins` (from an interrupted run's journal) win over where a branch points
  now, and the move is reported. A file's identity is its commit and etag, not its cached copy's inode.
- Network failures are retried with backoff; when retries run out it is one line (exit 1) saying the
  same command resumes.
"""

from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, urljoin, urlparse

from ...errors import MergeError

DEFAULT_ENDPOINT = "https://huggingface.co"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
# files fetched as soon as a repo is resolved: what config.json, tokenizers, processors and chat templates
# are made of (top-level only; never a weight)
SMALL_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
RETRIES = 5
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class HubNotFound(MergeError):
    """The reference names no repo there is (or none can be reached, or none is cached offline)."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(text: str) -> HubRef | None:
    """`org/name[@rev]` as mergekit reads it; None when `text` reads as a path (absolute, ./, ~, a
    backslash or more than one '/'), which stays a local folder."""
    if not text or text.startswith(("/", ".", "~")) or "\\" in text or ":" in text.split("@")[0]:
        return None
    name, _, rev = text.partition("@")
    if "@" in rev:
        raise MergeError(f"model '{text}': more than one '@' (write org/name@revision)")
    if not _REPO_ID.match(name) or ".." in name or name.endswith(".git"):
        return None
    return HubRef(name, rev or None)


# ---- settings, read when a run starts ----------------------------------------------------------

@dataclass
class HubSettings:
    endpoint: str
    cache_dir: Path
    token: str | None
    offline: bool
    stream: bool = False
    pins: dict[str, str] = field(default_factory=dict)  # str(HubRef) -> commit of an interrupted run


_overrides: dict = {}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def settings() -> HubSettings:
    """The Hub settings of this run: environment variables as huggingface_hub reads them, and the
    run's own options (`--transformers-cache`, `--stream`, pins)."""
    env = os.environ
    home = Path(env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    cache = _overrides.get("cache_dir") or env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or home / "hub"
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        token_file = Path(env.get("HF_TOKEN_PATH") or home / "token")
        try:
            token = token_file.read_text().strip() or None
        except OSError:
            token = None
    return HubSettings(endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"), cache_dir=Path(cache).expanduser(),
                       token=token, offline=_truthy(env.get("HF_HUB_OFFLINE")) or _truthy(env.get("TRANSFORMERS_OFFLINE")),
                       stream=bool(_overrides.get("stream")), pins=dict(_overrides.get("pins") or {}))


@dataclass(frozen=True)
class HubOptions:
    """A run's own Hub options: mergekit's `--transformers-cache DIR` (the cache Hub models are fetched
    into), `--stream` (read rows by ranged requests, fetch nothing), and the commits an interrupted run
    read (run.hub_pins)."""

    transformers_cache: str | Path | None = None
    stream: bool = False
    pins: dict[str, str] = field(default_factory=dict)


@contextmanager
def using_hub(options: HubOptions | None) -> Iterator[None]:
    """`options` while a run opens its models (engine/run.py's prepare functions, the CLI's other commands)."""
    if options is None:
        yield
        return
    previous = dict(_overrides)
    traffic.reset()  # a run's figures count its own requests
    with _snapshots_lock:
        _snapshots.clear()  # a run resolves its references afresh: a branch may have moved since the last
    _overrides.update(cache_dir=Path(options.transformers_cache).expanduser() if options.transformers_cache else None,
                      stream=options.stream, pins=dict(options.pins))
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(previous)


# ---- traffic, for report.json / profile.json ----------------------------------------------------

class Traffic:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.fetched_files = 0
        self.fetched_bytes = 0

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes = self.fetched_files = self.fetched_bytes = 0

    def add(self, requests: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes

    def figures(self) -> dict:
        return {"hub_requests": self.requests, "hub_bytes_read": self.bytes,
                "hub_files_fetched": self.fetched_files, "hub_bytes_fetched": self.fetched_bytes}


traffic = Traffic()


# ---- snapshots ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RepoFile:
    name: str
    size: int
    etag: str  # sha256 for LFS files, git blob sha1 otherwise


class HubSnapshot:
    """One repo at one commit: its files, its folder in the HF cache (files appear there once fetched),
    and ranged reads of what is not cached."""

    def __init__(self, ref: HubRef, commit: str, files: dict[str, RepoFile], path: Path, hub: HubSettings,
                 moved_to: str | None = None):
        self.ref, self.commit, self.files, self.path, self.hub = ref, commit, files, path, hub
        self.moved_to = moved_to  # where the branch points now, when a pin kept an older commit
        self._remote: dict[str, RemoteFile] = {}
        self._headers: dict[str, bytes] = {}  # read once per process (a plan, then its run, open models again)
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return f"{self.ref.repo_id}@{self.commit}"

    def has(self, name: str) -> bool:
        return name in self.files or (self.path / name).exists()

    def size(self, name: str) -> int:
        f = self.files.get(name)
        return f.size if f is not None else (self.path / name).stat().st_size

    def cached(self, name: str) -> bool:
        return (self.path / name).exists()

    def remote(self, name: str) -> "RemoteFile":
        with self._lock:
            if name not in self._remote:
                if self.hub.offline:
                    raise MergeError(f"model '{self.ref}': {name} is not in the cache ({self.path}) and HF_HUB_OFFLINE=1; "
                                     "run once online (or unset HF_HUB_OFFLINE) to fetch it")
                if name not in self.files:
                    raise MergeError(f"model '{self.ref}': the repo has no file {name} at commit {self.commit[:12]}")
                self._remote[name] = RemoteFile(self, self.files[name])
            return self._remote[name]

    def read_header(self, name: str) -> bytes:
        """The 8-byte length and JSON header of a safetensors file that is not cached, by ranged reads."""
        if name not in self._headers:
            self._headers[name] = self._read_header(name)
        return self._headers[name]

    def _read_header(self, name: str) -> bytes:
        """Two exact ranged reads, the length then the header: no byte of a weight is fetched."""
        remote = self.remote(name)
        length_bytes = bytearray(min(8, remote.size))
        remote.read_into(memoryview(length_bytes), 0, "its header length")
        if len(length_bytes) < 8:
            return bytes(length_bytes)
        length = int.from_bytes(length_bytes, "little")
        from .source import MAX_HEADER_BYTES

        if length > MAX_HEADER_BYTES or 8 + length > remote.size:
            return bytes(length_bytes)  # the parser names the corrupt length
        header = bytearray(length)
        remote.read_into(memoryview(header), 8, "its header")
        return bytes(length_bytes) + bytes(header)

    def fetch(self, names: list[str], on_bytes: Callable[[int], None] | None = None) -> None:
        """Download `names` into the cache (hf_hub_download: blobs + snapshot links, shared with transformers)."""
        for name in names:
            if self.cached(name):
                continue
            _download(self, name, on_bytes)
            traffic.fetched_files += 1
            traffic.fetched_bytes += self.size(name)


_snapshots: dict[tuple, HubSnapshot] = {}
_snapshots_lock = threading.Lock()


def open_snapshot(ref: HubRef, what: str) -> HubSnapshot:
    """Resolve `ref` to a commit and its files, and fetch its small files (config, tokenizer) into the
    cache; once per (settings, reference) in a process."""
    hub = settings()
    key = (hub.endpoint, str(hub.cache_dir), hub.offline, hub.pins.get(str(ref)), str(ref))
    with _snapshots_lock:
        if key in _snapshots:
            return _snapshots[key]
    commit, files, moved_to = (_resolve_offline if hub.offline else _resolve_online)(ref, hub, what)
    folder = repo_folder(hub.cache_dir, ref.repo_id)
    snapshot = HubSnapshot(ref, commit, files, folder / "snapshots" / commit, hub, moved_to)
    snapshot.path.mkdir(parents=True, exist_ok=True)
    if not hub.offline:
        rev = ref.revision or "main"
        if not _SHA.match(rev):  # as huggingface_hub does: refs/<branch or tag> -> commit, for offline runs and transformers
            (folder / "refs" / rev).parent.mkdir(parents=True, exist_ok=True)
            (folder / "refs" / rev).write_text(moved_to or commit)
        small = [n for n in files if "/" not in n and n.endswith(SMALL_SUFFIXES) and not n.endswith(WEIGHT_SUFFIXES)]
        snapshot.fetch(small)
    with _snapshots_lock:
        _snapshots[key] = snapshot
    return snapshot


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def _resolve_offline(ref: HubRef, hub: HubSettings, what: str) -> tuple[str, dict[str, RepoFile], None]:
    folder = repo_folder(hub.cache_dir, ref.repo_id)
    rev = ref.revision or "main"
    commit = hub.pins.get(str(ref))
    if commit is None:
        if _SHA.match(rev):
            commit = rev
        else:
            try:
                commit = (folder / "refs" / rev).read_text().strip()
            except OSError:
                commit = None
    if not commit or not (folder / "snapshots" / commit).is_dir():
        raise HubNotFound(f"{what}: HF_HUB_OFFLINE=1 and {ref} is not in the cache ({hub.cache_dir}); run once online "
                         "(or unset HF_HUB_OFFLINE), or point HF_HUB_CACHE/--transformers-cache at the cache that holds it")
    snap = folder / "snapshots" / commit
    files = {p.relative_to(snap).as_posix(): RepoFile(p.relative_to(snap).as_posix(), p.stat().st_size, _blob_etag(p))
             for p in snap.rglob("*") if p.is_file()}
    return commit, files, None


def _blob_etag(path: Path) -> str:
    """A cached file's etag: hf_hub_download names the blob after it."""
    return Path(os.path.realpath(path)).name


def _api(hub: HubSettings):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=hub.token or False)


def _resolve_online(ref: HubRef, hub: HubSettings, what: str) -> tuple[str, dict[str, RepoFile], str | None]:
    api = _api(hub)
    pinned = hub.pins.get(str(ref))
    with hub_errors(what, ref, hub):
        info = api.repo_info(ref.repo_id, revision=ref.revision or "main", repo_type="model")
        traffic.add(requests=1)
        current = info.sha
        commit = pinned or current
        entries = api.list_repo_tree(ref.repo_id, revision=commit, recursive=True, repo_type="model")
        files = {}
        for e in entries:
            if getattr(e, "size", None) is None or not hasattr(e, "blob_id"):
                continue  # a folder
            lfs = getattr(e, "lfs", None)
            etag = (lfs.sha256 if lfs is not None else None) or e.blob_id
            files[e.path] = RepoFile(e.path, e.size if lfs is None else lfs.size, etag)
        traffic.add(requests=1)
    if not any(n.endswith((".safetensors", ".bin")) for n in files) and not any(n.startswith("adapter_") for n in files):
        raise MergeError(f"{what}: repo {ref} has no .safetensors or .bin weights at commit {commit[:12]}; "
                         "is it a model repo (and not, say, GGUF only)?")
    return commit, files, (current if pinned and pinned != current else None)


@contextmanager
def hub_errors(what: str, ref: HubRef, hub: HubSettings, exit_code: int = 2) -> Iterator[None]:
    """huggingface_hub's exceptions as one line each, naming the reference and what to do."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import httpx

    token_hint = "give a token with HF_TOKEN=hf_... or `hf auth login`"
    try:
        yield
    except GatedRepoError:
        raise MergeError(f"{what}: {ref.repo_id} is a gated repo: accept its terms on its Hub page, then "
                         f"{token_hint}{' (the token given has no access)' if hub.token else ''}") from None
    except RepositoryNotFoundError:
        raise HubNotFound(f"{what}: no repo {ref.repo_id} on {hub.endpoint} "
                         f"(if it is private, {token_hint})") from None
    except RevisionNotFoundError:
        raise MergeError(f"{what}: repo {ref.repo_id} has no revision '{ref.revision}' (a branch, tag or commit)") from None
    except EntryNotFoundError as e:
        raise MergeError(f"{what}: {ref} has no file {getattr(e, 'filename', '') or 'of that name'}") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise MergeError(f"{what}: {ref} is not in the cache ({hub.cache_dir}) and the Hub cannot be reached "
                         "(HF_HUB_OFFLINE=1 or no network); run once online to fetch it") from None
    except (httpx.TransportError, OSError) as e:
        raise HubNotFound(f"{what}: the Hub at {hub.endpoint} does not answer ({type(e).__name__}); check the network "
                         "or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use what is cached", exit_code=exit_code) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else "?"
        raise MergeError(f"{what}: the Hub at {hub.endpoint} answered HTTP {status} for {ref}", exit_code=exit_code) from None


def _download(snapshot: HubSnapshot, name: str, on_bytes: Callable[[int], None] | None) -> None:
    from huggingface_hub import hf_hub_download

    hub = snapshot.hub
    tqdm_class = _progress_tqdm(on_bytes) if on_bytes else None
    for attempt in range(RETRIES):
        try:
            with hub_errors(f"model '{snapshot.ref}'", snapshot.ref, hub, exit_code=1):
                hf_hub_download(snapshot.ref.repo_id, name, revision=snapshot.commit, cache_dir=hub.cache_dir,
                                endpoint=hub.endpoint, token=hub.token or False, local_files_only=hub.offline,
                                tqdm_class=tqdm_class)
            traffic.add(requests=2)
            return
        except MergeError as e:
            if e.exit_code != 1 or attempt == RETRIES - 1:
                if e.exit_code == 1:
                    raise MergeError(f"{e} while fetching {name} ({RETRIES} tries); what was fetched is kept in the "
                                     "cache: run the same command again to go on", exit_code=1) from None
                raise
            time.sleep(min(0.2 * 2 ** attempt, 5))


def _progress_tqdm(on_bytes: Callable[[int], None]):
    """A tqdm stand-in for hf_hub_download that reports bytes to `on_bytes` (the CLI's rich bar)."""
    class Progress:
        def __init__(self, *args, **kwargs):
            self.n = kwargs.get("initial", 0) or 0
            self.total = kwargs.get("total")
            self.disable = False

        def update(self, n=1):
            self.n += n
            on_bytes(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

        def set_description(self, *a, **k):
            pass

        def refresh(self):
            pass

        @classmethod
        def get_lock(cls):
            return threading.RLock()

        @classmethod
        def set_lock(cls, lock):
            pass

    return Progress


# ---- ranged reads ------------------------------------------------------------------------------

class RemoteFile:
    """One file of a snapshot read by ranged GETs: resolved once (its redirect followed once, so the
    Hub's /resolve/ is hit once per file), every response checked."""

    def __init__(self, snapshot: HubSnapshot, file: RepoFile):
        self.snapshot, self.file = snapshot, file
        self.size = file.size
        self._url: str | None = None
        self._lock = threading.Lock()

    @property
    def what(self) -> str:
        return f"{self.snapshot.ref.repo_id}/{self.file.name}"

    def _headers(self, url: str) -> dict:
        hub = self.snapshot.hub
        same_origin = urlparse(url).netloc == urlparse(hub.endpoint).netloc
        return {"Authorization": f"Bearer {hub.token}"} if hub.token and same_origin else {}

    def _location(self, refresh: bool = False) -> str:
        from huggingface_hub.utils import get_session

        with self._lock:
            if self._url is None or refresh:
                hub, snap = self.snapshot.hub, self.snapshot
                url = f"{hub.endpoint}/{snap.ref.repo_id}/resolve/{snap.commit}/{quote(self.file.name)}"
                r = get_session().head(url, headers=self._headers(url), follow_redirects=False)
                traffic.add(requests=1)
                if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("Location"):
                    url = urljoin(url, r.headers["Location"])
                elif r.status_code >= 400:
                    code = r.headers.get("X-Error-Code", "")
                    hint = "accept its terms on its Hub page and give a token (HF_TOKEN or `hf auth login`)" \
                        if code == "GatedRepo" or r.status_code in (401, 403) else "check the reference"
                    raise MergeError(f"model '{snap.ref}': the Hub answered HTTP {r.status_code} {code} for {self.file.name}; {hint}")
                self._url = url
            return self._url

    def read_into(self, view: memoryview, pos: int, what: str) -> None:
        """Bytes [pos, pos + len(view)) of the file into `view`, checked; retried on network errors."""
        from huggingface_hub.utils import get_session, httpx

        n = len(view)
        if n == 0:
            return
        end = pos + n - 1
        expected = f"bytes {pos}-{end}/{self.size}"
        for attempt in range(RETRIES):
            try:
                url = self._location(refresh=attempt > 0)  # a HEAD that fails on the network is retried too
                with get_session().stream("GET", url, headers={**self._headers(url), "Range": f"bytes={pos}-{end}"},
                                          follow_redirects=True) as r:
                    traffic.add(requests=1)
                    if r.status_code in (401, 403) and attempt < RETRIES - 1:
                        continue  # a signed location that expired: resolve again
                    if r.status_code == 200:
                        raise MergeError(f"{self.what}: the server answered a ranged read ({what}) with the whole file "
                                         "(HTTP 200, not 206); it does not support ranged reads: run without --stream", exit_code=1)
                    if r.status_code != 206:
                        raise MergeError(f"{self.what}: HTTP {r.status_code} reading bytes {pos}-{end} ({what})", exit_code=1)
                    got_range = r.headers.get("Content-Range", "")
                    if got_range != expected:
                        raise MergeError(f"{self.what}: the server answered bytes {pos}-{end} ({what}) with Content-Range "
                                         f"'{got_range}' instead of '{expected}'; refusing bytes that may be others", exit_code=1)
                    done = 0
                    for chunk in r.iter_bytes():
                        k = len(chunk)
                        if done + k > n:
                            raise MergeError(f"{self.what}: the server sent more than the {n} bytes asked ({what})", exit_code=1)
                        view[done:done + k] = chunk
                        done += k
                    if done != n:
                        raise httpx.RemoteProtocolError(f"short body: {done} of {n} bytes")
                    traffic.add(nbytes=n)
                    return
            except (httpx.TransportError, httpx.StreamError):
                if attempt == RETRIES - 1:
                    raise MergeError(f"{self.what}: the connection failed {RETRIES} times reading {what}; what was written "
                                     "is kept: run the same command again to resume", exit_code=1) from None
                time.sleep(min(0.2 * 2 ** attempt, 5))
        raise MergeError(f"{self.what}: the Hub refused the read of {what} {RETRIES} times (HTTP 401/403); check the token",
                         exit_code=1)
