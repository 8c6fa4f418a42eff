"""A small Hugging Face Hub stand-in for tests: a real HTTP server on 127.0.0.1, standard library only.

It speaks the part of the Hub protocol that ``huggingface_hub`` 2.x uses to download and upload:

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1) for
  regular files; LFS files (``*.safetensors``, ``*.ckpt``, ...) answer ``302`` to ``/cdn/<sha256>`` on
  the ``localhost`` origin (same port, another origin, like the real CDN) with ``X-Linked-Etag``
  (the sha256) and ``X-Linked-Size``;
- ``GET /cdn/<sha256>`` (with ``Range``);
- ``404`` + ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``;
- ``GET /api/models/{repo}[/revision/{rev}]`` and ``/api/models/{repo}/tree/{rev}[/{path}]``;
- uploads: ``POST /api/repos/create``, ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}``,
  ``/{repo}.git/info/lfs/objects/batch``, ``PUT /lfs-upload/<sha256>``, ``/api/models/{repo}/commit/{rev}``.

Test helpers: :meth:`FakeHub.add_folder` / :meth:`add_files` (a new commit), :meth:`move_branch`,
:meth:`corrupt` and :meth:`truncate` (faults on the served bytes), and a request log
(:attr:`FakeHub.requests`).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.ckpt", "*.bin", "*.pt", "*.pth", "*.pkl", "*.npz")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        """The git blob id: of the content for a regular file, of the LFS pointer for an LFS file."""
        return git_blob_sha1(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Repo:
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)


@dataclass
class LoggedRequest:
    method: str
    path: str  # unquoted path
    query: dict
    headers: dict

    def __repr__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class _Fault:
    kind: str  # "corrupt" | "truncate"
    times: int | None  # None: every time
    nbytes: int = 0
    honest_length: bool = False


class FakeHub:
    """A Hub-protocol server. Use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, *, lfs_patterns: tuple[str, ...] = LFS_PATTERNS):
        self.lfs_patterns = lfs_patterns
        self.repos: dict[str, Repo] = {}
        self.requests: list[LoggedRequest] = []
        self._faults: dict[str, _Fault] = {}  # by etag of the served blob
        self._uploads: dict[str, bytes] = {}  # LFS uploads by sha256
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_origin(self) -> str:
        return f"http://localhost:{self.port}"

    # ---- content -----------------------------------------------------------------------------------
    def is_lfs(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in self.lfs_patterns)

    def create_repo(self, repo_id: str) -> bool:
        """Create an empty repo (one empty commit on ``main``); False if it exists."""
        with self._lock:
            if repo_id in self.repos:
                return False
            repo = self.repos[repo_id] = Repo()
            sha = self._new_commit_id(repo_id, {}, None, "initial commit")
            repo.commits[sha] = {}
            repo.parents[sha] = None
            repo.branches["main"] = sha
            return True

    def _new_commit_id(self, repo_id: str, tree: dict, parent: str | None, message: str) -> str:
        self._counter += 1
        h = hashlib.sha1(json.dumps([repo_id, parent, message, self._counter, time.time_ns(),
                                     sorted((k, v.git_oid) for k, v in tree.items())]).encode())
        return h.hexdigest()

    def add_files(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "update",
                  replace: bool = False, deletions: tuple[str, ...] = ()) -> str:
        """Commit ``files`` (path -> bytes) on ``branch`` (created if needed); return the commit sha.

        ``replace=True`` makes the commit's tree exactly ``files``; otherwise they are added to the parent's.
        """
        with self._lock:
            self.create_repo(repo_id)
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch) or repo.branches["main"]
            tree = {} if replace else dict(repo.commits[parent])
            for path in deletions:
                tree = {k: v for k, v in tree.items() if k != path and not k.startswith(path.rstrip("/") + "/")}
            for path, data in files.items():
                tree[path.strip("/")] = StoredFile(bytes(data), self.is_lfs(path))
            sha = self._new_commit_id(repo_id, tree, parent, message)
            repo.commits[sha] = tree
            repo.parents[sha] = parent
            repo.branches[branch] = sha
            return sha

    def add_folder(self, repo_id: str, folder: str | Path, *, branch: str = "main", path_in_repo: str = "",
                   message: str = "upload folder", replace: bool = True) -> str:
        """Commit every file under ``folder`` (as the whole tree unless ``replace=False``); return the sha."""
        folder = Path(folder)
        prefix = path_in_repo.strip("/") + "/" if path_in_repo.strip("/") else ""
        files = {prefix + p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_files(repo_id, files, branch=branch, message=message, replace=replace)

    def move_branch(self, repo_id: str, branch: str, commit: str) -> None:
        with self._lock:
            repo = self.repos[repo_id]
            assert commit in repo.commits, f"unknown commit {commit}"
            repo.branches[branch] = commit

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def file(self, repo_id: str, path: str, revision: str = "main") -> StoredFile:
        repo = self.repos[repo_id]
        return repo.commits[self._resolve(repo, revision)][path]

    # ---- faults ------------------------------------------------------------------------------------
    def corrupt(self, repo_id: str, path: str, *, revision: str = "main", times: int | None = None) -> None:
        """Serve the file with one byte flipped (same length, same advertised hash) ``times`` times
        (``None``: always) — what a tampered mirror or a bit flip in transit looks like to the client."""
        with self._lock:
            self._faults[self.file(repo_id, path, revision).etag] = _Fault("corrupt", times)

    def truncate(self, repo_id: str, path: str, *, nbytes: int, revision: str = "main", times: int | None = None,
                 honest_length: bool = False) -> None:
        """Cut the body of the file after ``nbytes`` ``times`` times (``None``: always).

        By default the full ``Content-Length`` is announced and the connection is closed early (a dropped
        transfer; the client may resume with ``Range``). With ``honest_length=True`` the short length is
        announced (a server that really has a truncated copy).
        """
        with self._lock:
            self._faults[self.file(repo_id, path, revision).etag] = _Fault("truncate", times, nbytes, honest_length)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, etag: str) -> _Fault | None:
        with self._lock:
            fault = self._faults.get(etag)
            if fault is None:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[etag]
            return fault

    # ---- log ---------------------------------------------------------------------------------------
    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def log(self, *, method: str | None = None, contains: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (contains is None or contains in r.path)]

    # ---- helpers for the handler -------------------------------------------------------------------
    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        return None

    def _blob(self, sha256: str) -> bytes | None:
        with self._lock:
            for repo in self.repos.values():
                for tree in repo.commits.values():
                    for f in tree.values():
                        if f.lfs and f.sha256 == sha256:
                            return f.data
        return None


def _split_repo(parts: list[str]) -> tuple[str, list[str]]:
    return "/".join(parts[:2]), parts[2:]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format, *args):  # quiet
        pass

    # ---- plumbing ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, length: int | None = None,
              close: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD" and body:
            try:
                self.wfile.write(body)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
        h = {"X-Error-Message": message, **(headers or {})}
        if code:
            h["X-Error-Code"] = code
        self._json(status, {"error": message}, h)

    def _record(self) -> tuple[list[str], dict]:
        url = urlsplit(self.path)
        path = unquote(url.path)
        with self.fake._lock:
            self.fake.requests.append(LoggedRequest(self.command, path, parse_qs(url.query), dict(self.headers)))
        return [unquote(p) for p in url.path.split("/") if p], parse_qs(url.query)

    def _repo_or_404(self, repo_id: str) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit_or_404(self, repo: Repo, revision: str) -> str | None:
        commit = self.fake._resolve(repo, revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _serve_bytes(self, data: bytes, etag: str, headers: dict) -> None:
        fault = self.fake._take_fault(etag) if self.command == "GET" else None
        if fault is not None and fault.kind == "corrupt" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:] if len(data) == 1 else data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        total = len(data)
        rng = self.headers.get("Range") if self.command == "GET" else None
        status = 200
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].split(",")[0].partition("-")
            start = int(first or 0)
            end = min(int(last) + 1, total) if last else total
            data = data[start:end]
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"}
        if fault is not None and fault.kind == "truncate" and self.command == "GET":
            cut = max(0, fault.nbytes - start)
            if fault.honest_length:
                self._send(status, data[:cut], headers)
            else:
                self._send(status, data[:cut], headers, length=len(data), close=True)
            return
        self._send(status, data, headers)

    # ---- verbs -------------------------------------------------------------------------------------
    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self) -> None:
        parts, query = self._record()
        body = self._body() if self.command in ("POST", "PUT") else b""
        try:
            if parts[:1] == ["cdn"] and len(parts) == 2:
                return self._cdn(parts[1])
            if parts[:2] == ["api", "agent-harnesses"]:
                return self._error(404, None, "not here")
            if parts[:2] == ["api", "repos"] and parts[2:] == ["create"] and self.command == "POST":
                return self._create_repo(json.loads(body or b"{}"))
            if parts[:2] == ["api", "validate-yaml"]:
                return self._json(200, {"errors": [], "warnings": []})
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = _split_repo(parts[2:])
                return self._api(repo_id, rest, query, body)
            if parts[:1] == ["lfs-upload"] and len(parts) == 2 and self.command == "PUT":
                return self._lfs_upload(parts[1], body)
            if len(parts) >= 4 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
                return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body or b"{}"))
            if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            self._error(404, None, f"no route for {self.command} {self.path}")
        except Exception as err:  # pragma: no cover - shows up as a 500 in the client
            self._error(500, None, f"fakehub error: {type(err).__name__}: {err}")

    # ---- downloads ---------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        commit = self._commit_or_404(repo, revision)
        if commit is None:
            return
        f = repo.commits[commit].get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                               {"X-Repo-Commit": commit})
        common = {"X-Repo-Commit": commit}
        if f.lfs:
            location = f"{self.fake.cdn_origin}/cdn/{f.sha256}"
            return self._send(302, b"", {**common, "Location": location, "ETag": f'"{f.git_oid}"',
                                         "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": len(f.data)})
        self._serve_bytes(f.data, f.etag, {**common, "ETag": f'"{f.git_oid}"',
                                           "Content-Type": "application/octet-stream"})

    def _cdn(self, sha256: str) -> None:
        data = self.fake._blob(sha256)
        if data is None:
            return self._error(404, None, "no such object")
        self._serve_bytes(data, sha256, {"ETag": f'"{sha256}"', "Content-Type": "application/octet-stream"})

    def _api(self, repo_id: str, rest: list[str], query: dict, body: bytes) -> None:
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        if self.command == "GET" and (not rest or rest[0] == "revision"):
            revision = rest[1] if len(rest) > 1 else "main"
            commit = self._commit_or_404(repo, revision)
            if commit is None:
                return
            tree = repo.commits[commit]
            return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                    "siblings": [{"rfilename": p} for p in sorted(tree)], "tags": [],
                                    "library_name": "semdiff"})
        if self.command == "GET" and rest and rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit_or_404(repo, rest[1])
            if commit is None:
                return
            prefix = "/".join(rest[2:]).strip("/")
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            return self._json(200, self._tree(repo.commits[commit], prefix, recursive))
        if self.command == "POST" and rest and rest[0] == "preupload":
            payload = json.loads(body or b"{}")
            return self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if self.fake.is_lfs(f["path"]) else "regular",
                 "shouldIgnore": False, "oid": None} for f in payload.get("files", [])]})
        if self.command == "POST" and rest and rest[0] == "commit" and len(rest) >= 2:
            return self._commit(repo_id, repo, rest[1], body)
        self._error(404, None, f"no api route {rest}")

    @staticmethod
    def _tree(tree: dict[str, StoredFile], prefix: str, recursive: bool) -> list[dict]:
        out, dirs = [], set()
        base = prefix + "/" if prefix else ""
        for path in sorted(tree):
            if not path.startswith(base):
                continue
            rel = path[len(base):]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = base + "/".join(parts[:i])
                if d not in dirs and (recursive or i == 1):
                    dirs.add(d)
                    out.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(),
                                "size": 0})
            if len(parts) > 1 and not recursive:
                continue
            f = tree[path]
            item = {"type": "file", "path": path, "oid": f.git_oid, "size": len(f.data)}
            if f.lfs:
                item["lfs"] = {"oid": f.sha256, "size": len(f.data),
                               "pointerSize": len(lfs_pointer(f.sha256, len(f.data)))}
            out.append(item)
        return out

    # ---- uploads -----------------------------------------------------------------------------------
    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        if not self.fake.create_repo(repo_id):  # the Hub also sends the url with the conflict
            return self._json(409, {"error": "You already created this model repo",
                                    "url": f"{self.fake.endpoint}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        self._json(200, {"url": f"{self.fake.endpoint}/{repo_id}", "name": repo_id})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        if self._repo_or_404(repo_id) is None:
            return
        objects = []
        for obj in payload.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"]}
            if self.fake._blob(obj["oid"]) is None and obj["oid"] not in self.fake._uploads:
                item["actions"] = {"upload": {"href": f"{self.fake.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(item)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_upload(self, sha256: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != sha256:
            return self._error(400, None, "sha256 of the upload does not match its oid")
        with self.fake._lock:
            self.fake._uploads[sha256] = body
        self._send(200)

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> None:
        branch = revision
        if branch not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files: dict[str, bytes] = {}
        deletions: list[str] = []
        message = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary") or message
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.fake._uploads.get(value["oid"]) or self.fake._blob(value["oid"])
                if data is None:
                    return self._error(400, None, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"])
        sha = self.fake.add_files(repo_id, files, branch=branch, message=message, deletions=tuple(deletions))
        self._json(200, {"success": True, "commitOid": sha,
                         "commitUrl": f"{self.fake.endpoint}/{repo_id}/commit/{sha}"})


def hub_url(hub: FakeHub, repo_id: str, revision: str, path: str) -> str:
    return f"{hub.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{path}"
