"""A Hub-compatible loopback HTTP server for the test suite, with fault injection, and the ``hub`` pytest fixture.

The server speaks just enough of the Hugging Face Hub API for the real clients (``huggingface_hub``, and through it
transformers and peft) to create repos, commit, list and download: every file is a "regular" git blob whose content
travels inline (base64) in the NDJSON commit, so no LFS or Xet storage is involved. Endpoints and answer shapes were
read from huggingface_hub 2.4 (``hf_api.py``, ``_commit_api.py``, ``_upload_pipeline.py``, ``file_download.py``).

Tests drive it through the ``hub`` fixture (a :class:`HubServer`)::

    def test_push(hub):
        hub.fail_next("commit", status=500)  # the next commit POST answers 500
        with hub.refused():  # nothing listens on the port inside the block
            ...
        assert hub.ops.count("commit") == 2
        assert hub.files("loopback-user/repo")["config.json"]
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import re
import runpy
import socket
import sys
import threading
import time
import traceback
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

DUMMY_TOKEN = "hf_loopback_dummy_token"
DEFAULT_USER = "loopback-user"
# What the Hub puts in the initial commit of every new repo (abridged).
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_WRITE_OPS = {"create", "delete", "settings", "preupload", "commit", "branch"}


def git_blob_oid(content: bytes) -> str:
    """The git blob sha1 of ``content`` (what the Hub calls a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _card_metadata(content: str) -> dict[str, Any] | None:
    """The YAML front matter of a README, ``None`` without one; raises ``ValueError`` when it is not a mapping."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise ValueError(f"Invalid YAML in README.md metadata: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README.md metadata must be a YAML mapping")
    return data


@dataclass
class Commit:
    """One commit: a full snapshot of the repo's files."""

    oid: str
    title: str
    description: str
    parent: str | None
    files: dict[str, bytes]
    created_at: str


@dataclass
class Repo:
    """A repo held in memory."""

    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # commit oids, oldest first


class HubRequest(NamedTuple):
    """One request the server received: ``op`` is the endpoint's short name (see :meth:`HubServer.fail_next`)."""

    method: str
    path: str
    query: str
    op: str
    status: int  # 0 when the connection was dropped without an answer


@dataclass
class _Fault:
    op: str
    method: str | None
    status: int | None
    delay: float
    drop: bool
    body: Any
    remaining: int


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


class _Response(NamedTuple):
    status: int
    body: bytes = b""
    headers: dict[str, str] = {}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def _error(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> _Response:
    extra = {"X-Error-Message": message, **(headers or {})}
    if code is not None:
        extra["X-Error-Code"] = code
    return _json({"error": message}, status, extra)


_REPO = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[tuple[str, ...], re.Pattern[str], str]] = [
    (("GET",), re.compile(r"/api/whoami-v2"), "whoami"),
    (("POST",), re.compile(r"/api/repos/create"), "create"),
    (("DELETE",), re.compile(r"/api/repos/delete"), "delete"),
    (("POST",), re.compile(r"/api/validate-yaml"), "validate_yaml"),
    (("PUT",), re.compile(_REPO + r"/settings"), "settings"),
    (("POST",), re.compile(_REPO + r"/preupload/(?P<rev>[^/]+)"), "preupload"),
    (("POST",), re.compile(_REPO + r"/commit/(?P<rev>[^/]+)"), "commit"),
    (("GET",), re.compile(_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    (("POST",), re.compile(_REPO + r"/paths-info/(?P<rev>[^/]+)"), "paths_info"),
    (("GET",), re.compile(_REPO + r"/refs"), "refs"),
    (("POST",), re.compile(_REPO + r"/branch/(?P<rev>[^/]+)"), "branch"),
    (("GET",), re.compile(_REPO + r"(?:/revision/(?P<rev>[^/]+))?"), "info"),
    (
        ("GET", "HEAD"),
        re.compile(r"/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
        "resolve",
    ),
]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a peer hanging up is not a server bug
            self.hub._record_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub: the client pools connections
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.hub._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.hub._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Silence the default stderr access log (``hub.requests`` records every request)."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        split = urlsplit(self.path)
        request = _Request(self.command, split.path, parse_qs(split.query), self.headers, self._read_body())
        response = self.server.hub._handle(request, split.query)
        if response is None:  # injected drop: hang up without answering
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve


class HubServer:
    """An in-memory, Hub-compatible HTTP server on ``127.0.0.1`` (OS-chosen port), with fault injection.

    Attributes: ``endpoint`` (``http://127.0.0.1:PORT``), ``port``, ``user`` (the namespace of ``whoami`` and of
    repos created without one), ``tokens`` (accepted bearer tokens; writes and private repos need one), ``requests``
    (a copy of the request log), ``ops`` (the log's op names), ``errors`` (server-side tracebacks: server bugs).
    """

    def __init__(self, user: str = DEFAULT_USER, tokens: tuple[str, ...] = (DUMMY_TOKEN,)) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.user = user
        self.tokens = set(tokens)
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._faults: list[_Fault] = []
        self._requests: list[HubRequest] = []
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._commit_count = 0

    # ---------------------------------------------------------------- lifecycle and network faults

    @property
    def endpoint(self) -> str:
        """The base URL to use as ``HF_ENDPOINT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        """Whether the server accepts connections."""
        return self._httpd is not None

    def start(self) -> HubServer:
        """Listen (on a new OS-chosen port the first time, on the same port afterwards)."""
        with self._lock:
            if self._httpd is None:
                httpd = _HTTPServer((self.host, self.port), _Handler)
                httpd.hub = self
                self.port = httpd.server_address[1]
                self._thread = threading.Thread(
                    target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="loopback-hub", daemon=True
                )
                self._httpd = httpd
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and hang up every open connection: clients then get "connection refused"."""
        with self._lock:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
            connections = list(self._connections)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        for connection in connections:  # pooled keep-alive connections would otherwise still be served
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    refuse_connections = stop
    accept_connections = start

    @contextlib.contextmanager
    def refused(self) -> Iterator[None]:
        """Refuse connections inside the block, then listen again on the same port."""
        self.refuse_connections()
        try:
            yield
        finally:
            self.accept_connections()

    def reset(self) -> None:
        """Forget repos, faults, the request log and errors, and listen again if refusing."""
        with self._lock:
            self._repos.clear()
            self._faults.clear()
            self._requests.clear()
            self.errors.clear()
        self.start()

    # ---------------------------------------------------------------- fault injection and the request log

    def fail_next(
        self,
        op: str,
        status: int | None = 500,
        times: int = 1,
        *,
        method: str | None = None,
        delay: float = 0.0,
        drop: bool = False,
        body: Any = None,
    ) -> None:
        """Make the next ``times`` requests to ``op`` fail.

        ``op`` is one of ``whoami create delete settings validate_yaml preupload commit info tree paths_info refs
        branch resolve`` or ``"*"`` (any). The request gets ``status`` (with a JSON ``body``, default
        ``{"error": ...}``) after ``delay`` seconds; ``status=None`` only delays; ``drop=True`` hangs up without an
        answer. ``method`` narrows the match (e.g. ``"HEAD"`` for resolve). Faults match in the order given.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.append(_Fault(op, method, status, delay, drop, body, times))

    def delay_next(self, op: str, seconds: float, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``op`` normally, but ``seconds`` late."""
        self.fail_next(op, status=None, times=times, delay=seconds)

    @property
    def pending_faults(self) -> int:
        """How many injected failures have not fired yet."""
        with self._lock:
            return sum(fault.remaining for fault in self._faults)

    @property
    def requests(self) -> list[HubRequest]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def ops(self) -> list[str]:
        """The op names of the request log, oldest first (e.g. ``["create", "preupload", "commit"]``)."""
        return [request.op for request in self.requests]

    def clear_requests(self) -> None:
        """Empty the request log."""
        with self._lock:
            self._requests.clear()

    # ---------------------------------------------------------------- state, for seeding and assertions

    def add_repo(
        self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False, repo_type: str = "model"
    ) -> str:
        """Create a repo directly (no HTTP) with an initial commit plus ``files``; returns the head commit oid."""
        with self._lock:
            repo = self._new_repo(repo_id, repo_type, private)
            if files:
                self._commit(repo, "main", {**repo.commits[repo.branches["main"]].files, **files}, "Add files", "")
            return repo.branches["main"]

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo (``KeyError`` if absent)."""
        with self._lock:
            return self._repos[(repo_type, repo_id)]

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        """Whether the repo exists."""
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a branch or commit."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return dict(repo.commits[self._resolve(repo, revision) or revision].files)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """Every commit of a repo, newest first."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return [repo.commits[oid] for oid in reversed(repo.history)]

    # ---------------------------------------------------------------- internals

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _record_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _new_repo(self, repo_id: str, repo_type: str, private: bool) -> Repo:
        if (repo_type, repo_id) in self._repos:
            raise ValueError(f"{repo_type} repo {repo_id} exists")
        repo = Repo(repo_id, repo_type, private, _now())
        self._repos[(repo_type, repo_id)] = repo
        self._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit", "")
        return repo

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], title: str, description: str) -> Commit:
        self._commit_count += 1
        parent = repo.branches.get(branch)
        seed = json.dumps([repo.repo_id, parent, title, self._commit_count, sorted(files)]).encode()
        oid = hashlib.sha1(seed + b"".join(git_blob_oid(files[path]).encode() for path in sorted(files))).hexdigest()
        commit = Commit(oid, title, description, parent, files, _now())
        repo.commits[oid] = commit
        repo.history.append(oid)
        repo.branches[branch] = oid
        return commit

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in repo.branches:
            return repo.branches[revision[len("refs/heads/") :]]
        return revision if revision in repo.commits else None

    def _take_fault(self, op: str, method: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.op in (op, "*") and fault.method in (None, method):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _handle(self, request: _Request, query: str) -> _Response | None:
        op, params = "unknown", {}
        for methods, pattern, name in _ROUTES:
            match = pattern.fullmatch(request.path)
            if match is not None and request.method in methods:
                op, params = name, {key: unquote(value) for key, value in match.groupdict().items() if value}
                break
        response: _Response | None
        fault = self._take_fault(op, request.method)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.drop:
            response = None
        elif fault is not None and fault.status is not None:
            body = fault.body if fault.body is not None else {"error": f"Injected {fault.status} on {op}"}
            response = _json(body, fault.status, {"X-Error-Message": f"Injected {fault.status} on {op}"})
        else:
            try:
                response = self._route(op, params, request)
            except Exception:  # a server bug: answer 500 and keep the traceback for the fixture to report
                self._record_error(traceback.format_exc())
                response = _error(500, "Loopback hub internal error")
        with self._lock:
            status = 0 if response is None else response.status
            self._requests.append(HubRequest(request.method, request.path, query, op, status))
        return response

    def _route(self, op: str, params: dict[str, str], request: _Request) -> _Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        authorized = token in self.tokens
        if op == "unknown":
            return _error(404, f"Loopback hub: no route for {request.method} {request.path}")
        if op == "validate_yaml":
            return self._validate_yaml(request)
        if op in _WRITE_OPS | {"whoami"} and not authorized:
            return _error(401, "Invalid credentials in Authorization header")
        if op == "whoami":
            return self._whoami()
        if op == "create":
            return self._create(request)
        if op == "delete":
            return self._delete(request)
        with self._lock:
            repo_type = _TYPES.get(params.get("type", "models"), "model")
            repo = self._repos.get((repo_type, params["repo"]))
            if repo is None or (repo.private and not authorized):
                return _error(404 if authorized else 401, "Repository not found", "RepoNotFound")
            if op == "settings":
                return self._settings(repo, request)
            if op == "refs":
                return self._refs(repo)
            if op == "branch":
                return self._branch(repo, params["rev"], request)
            revision = params.get("rev", "main")
            oid = self._resolve(repo, revision)
            if oid is None or (op in ("preupload", "commit") and revision not in repo.branches):
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if op in ("preupload", "commit") and "create_pr" in request.query:
                return _error(400, "create_pr is not supported by the loopback hub")
            commit = repo.commits[oid]
            if op == "info":
                return self._info(repo, commit, request)
            if op == "tree":
                return self._tree(commit, params.get("path", ""), request)
            if op == "paths_info":
                return self._paths_info(commit, request)
            if op == "preupload":
                return self._preupload(commit, request)
            if op == "commit":
                return self._commit_request(repo, revision, request)
            return self._resolve_file(commit, params["path"], request)

    # ---------------------------------------------------------------- endpoints

    def _whoami(self) -> _Response:
        return _json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.user,
                "fullname": "Loopback User",
                "email": f"{self.user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
            }
        )

    def _create(self, request: _Request) -> _Response:
        payload = request.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                existing = self._repos[(repo_type, repo_id)]
                # The Hub's 409 carries the url too: `create_repo(exist_ok=True)` reads it from the error answer.
                return _json({"error": f"You already created this {repo_type} repo", "url": self._url(existing)}, 409)
            repo = self._new_repo(repo_id, repo_type, private)
            return _json({"url": self._url(repo), "name": repo_id, "id": repo_id})

    def _delete(self, request: _Request) -> _Response:
        payload = request.json()
        key = (payload.get("type") or "model", f"{payload.get('organization') or self.user}/{payload['name']}")
        with self._lock:
            if self._repos.pop(key, None) is None:
                return _error(404, "Repository not found", "RepoNotFound")
        return _json({})

    def _settings(self, repo: Repo, request: _Request) -> _Response:
        payload = request.json()
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        return _json({})

    def _validate_yaml(self, request: _Request) -> _Response:
        try:
            _card_metadata(request.json().get("content", ""))
        except ValueError as error:
            return _json({"errors": [{"message": str(error)}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _refs(self, repo: Repo) -> _Response:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in repo.branches.items()
        ]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _branch(self, repo: Repo, branch: str, request: _Request) -> _Response:
        start = request.json().get("startingPoint") or "main"
        oid = self._resolve(repo, start)
        if oid is None:
            return _error(404, f"Invalid rev id: {start}", "RevisionNotFound")
        if branch in repo.branches:
            return _error(409, "Reference already exists")
        repo.branches[branch] = oid
        return _json({})

    def _info(self, repo: Repo, commit: Commit, request: _Request) -> _Response:
        blobs = request.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(commit.files[path]), blobId=git_blob_oid(commit.files[path]))
            siblings.append(sibling)
        try:
            card = _card_metadata(commit.files.get("README.md", b"").decode("utf-8", "replace"))
        except ValueError:
            card = None
        namespace = repo.repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": namespace,
            "sha": commit.oid,
            "lastModified": commit.created_at,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []),
            "siblings": siblings,
            "usedStorage": sum(len(content) for content in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if card is not None:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if key in card:
                    info[key] = card[key]
        return _json(info)

    @staticmethod
    def _entries(commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Tree entries under ``prefix`` (a folder path, "" for the root): directories first, like the Hub."""
        base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        folders: dict[str, list[str]] = {}
        files = []
        for path in sorted(commit.files):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.setdefault(base + "/".join(parts[:depth]), []).append(path)
            if recursive or len(parts) == 1:
                files.append(path)
        entries = [
            {"type": "directory", "oid": hashlib.sha1("\n".join(members).encode()).hexdigest(), "size": 0, "path": p}
            for p, members in sorted(folders.items())
        ]
        entries += [
            {"type": "file", "oid": git_blob_oid(commit.files[p]), "size": len(commit.files[p]), "path": p}
            for p in files
        ]
        return entries

    def _tree(self, commit: Commit, path: str, request: _Request) -> _Response:
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        path = path.strip("/")
        if path and not any(name.startswith(path + "/") for name in commit.files):
            return _error(404, f"Entry not found: {path}", "EntryNotFound")
        return _json(self._entries(commit, path, recursive))

    def _paths_info(self, commit: Commit, request: _Request) -> _Response:
        form = parse_qs(request.body.decode())
        entries = []
        for path in (p.strip("/") for p in form.get("paths", [])):
            if path in commit.files:
                content = commit.files[path]
                entries.append({"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path})
            else:
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                entries += [entry for entry in self._entries(commit, parent, False) if entry["path"] == path]
        return _json(entries)

    def _preupload(self, commit: Commit, request: _Request) -> _Response:
        files = []
        for item in request.json().get("files", []):
            existing = commit.files.get(item["path"])
            # Every file is "regular": its content travels base64 in the commit, no LFS/Xet transfer needed.
            # `oid` lets the client skip unchanged files; `shouldIgnore` is read unconditionally by the client.
            oid = None if existing is None else git_blob_oid(existing)
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return _json({"files": files, "commitOid": commit.oid})

    def _commit_request(self, repo: Repo, branch: str, request: _Request) -> _Response:
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return _error(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        head = repo.branches[branch]
        if header.get("parentCommit") not in (None, head):
            return _error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    return _error(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[path] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if path not in files:
                    return _error(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.strip("/") + "/"
                doomed = [name for name in files if name.startswith(prefix)]
                if not doomed:
                    return _error(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in doomed:
                    del files[name]
            elif key == "lfsFile":
                return _error(400, "The loopback hub stores no LFS objects (preupload answers 'regular')")
            else:
                return _error(400, f"Unknown commit operation {key!r}")
        commit = self._commit(repo, branch, files, header.get("summary", ""), header.get("description", ""))
        return _json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._url(repo)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _resolve_file(self, commit: Commit, path: str, request: _Request) -> _Response:
        headers = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            return _error(404, "Entry not found", "EntryNotFound", headers)
        content = commit.files[path]
        headers.update(
            {"ETag": f'"{git_blob_oid(content)}"', "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        )
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", "") or "")
        if request.method == "GET" and byte_range is not None:
            start = int(byte_range.group(1))
            end = min(int(byte_range.group(2) or len(content) - 1), len(content) - 1)
            if start >= len(content):
                return _Response(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return _Response(206, content[start : end + 1], headers)
        return _Response(200, content, headers)


# -------------------------------------------------------------------- pointing the real clients at the server


_CONSTANT_COPIERS = (
    "huggingface_hub.utils._cache_manager",  # HF_HUB_CACHE
    "huggingface_hub.utils._cache_assets",  # HF_ASSETS_CACHE
    "huggingface_hub.utils._git_credential",  # ENDPOINT
)


class _NoSleepTime(types.ModuleType):
    """Stands in for the ``time`` module inside ``huggingface_hub.utils._http``: ``sleep`` only records."""

    def __init__(self) -> None:
        super().__init__("time")
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def use_loopback_hub(
    endpoint: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch, token: str = DUMMY_TOKEN
) -> dict[str, tuple[Any, Any]]:
    """Point huggingface_hub, transformers, peft and datasets at ``endpoint``, with a fresh ``hf_home``.

    Environment variables alone are not enough once the libraries are imported (the conftest imports them):
    ``huggingface_hub.constants`` computes ``ENDPOINT``, the ``HUGGINGFACE_CO_URL_TEMPLATE`` download URL,
    ``HF_URL_HOSTS``, the cache and token paths and the ``HF_HUB_OFFLINE``/``HF_HUB_DISABLE_TELEMETRY`` flags once,
    at import. So this function sets the variables, re-runs ``constants.py`` under them to get the values a fresh
    import would compute, and patches every one that differs on ``constants`` and on any ``huggingface_hub`` module
    that copied it with ``from ..constants import X`` (e.g. ``utils._cache_manager.HF_HUB_CACHE``). It also patches
    the objects that captured the endpoint when they were built: the module-level ``HfApi`` behind
    ``huggingface_hub.create_repo``/``upload_folder``/``file_exists`` (``hf_api.api``; peft calls ``file_exists``)
    and ``hf_file_system.hffs``; it empties transformers' cached ``HfApi`` (``transformers.utils.hub._hf_api``,
    rebuilt lazily) and patches ``datasets.config.HF_ENDPOINT``/``HUB_DATASETS_URL``/``HF_HUB_OFFLINE``. Everything
    goes through ``monkeypatch``, so it is all undone at teardown. Returns ``{name: (old, new)}`` of the constants.
    """
    from huggingface_hub import constants, hf_api, hf_file_system

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_TELEMETRY": "1",  # also skips the agent-harness registry fetch from the endpoint
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    unset = [
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ASSETS_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
        "HF_XET_CACHE",
        "HF_TOKEN_PATH",
        "XDG_CACHE_HOME",
    ]
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # Modules that copy constants with `from ..constants import X` are loaded lazily: import them first, so that the
    # patch reaches them (and is undone on them) instead of their first import copying a value bound to this test.
    for module_name in _CONSTANT_COPIERS:
        with contextlib.suppress(ImportError):
            importlib.import_module(module_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = runpy.run_path(constants.__file__)
    changed = {}
    for name, new in fresh.items():
        if name.startswith("__") or not hasattr(constants, name) or callable(new) or isinstance(new, types.ModuleType):
            continue
        old = getattr(constants, name)
        if old == new:
            continue
        changed[name] = (old, new)
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("huggingface_hub") and hasattr(module, name) and getattr(module, name) == old:
                monkeypatch.setattr(module, name, new)

    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(hf_file_system.hffs, "endpoint", endpoint)
    monkeypatch.setattr(hf_file_system.hffs._api, "endpoint", endpoint)
    with contextlib.suppress(ImportError):
        monkeypatch.setattr(importlib.import_module("transformers.utils.hub"), "_hf_api", None)
    with contextlib.suppress(ImportError):
        datasets_config = importlib.import_module("datasets.config")
        monkeypatch.setattr(datasets_config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(
            datasets_config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
        )
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", False)
    return changed


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """The session's loopback Hub server (use ``hub`` in tests: it resets the server and points clients at it)."""
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A clean loopback Hub that the real clients (huggingface_hub, transformers, peft, datasets) talk to.

    One server runs for the whole session (same port, so URLs cached by the libraries stay valid); each test gets
    it empty, listening, without faults and with an empty request log. The environment is set (``HF_ENDPOINT``,
    ``HF_HOME=tmp_path/"hf_home"``, ``HF_TOKEN=hf_loopback_dummy_token``, ``HF_HUB_DISABLE_TELEMETRY=1``,
    ``HF_HUB_OFFLINE=0``) and, because huggingface_hub reads it at import, its module-level constants and the
    objects built from them are patched too: see :func:`use_loopback_hub`. All of it is undone after the test.
    The test fails at teardown if the server hit an internal error (a server bug, not an injected fault).

    Yields the :class:`HubServer`: ``endpoint``, ``user``, ``requests``/``ops`` (the log), ``fail_next(op,
    status=500, times=1, delay=, drop=)``, ``delay_next``, ``refuse_connections()``/``accept_connections()`` and
    ``refused()`` (a context manager), and ``add_repo``/``files``/``commits``/``repo`` for seeding and assertions.
    """
    hub_server.reset()
    use_loopback_hub(hub_server.endpoint, tmp_path / "hf_home", monkeypatch)
    yield hub_server
    errors = list(hub_server.errors)
    hub_server.reset()
    if errors:
        pytest.fail("The loopback hub hit internal errors:\n" + "\n".join(errors))


@pytest.fixture
def instant_retries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make huggingface_hub's ``http_backoff`` retry without sleeping; yields the list of skipped waits.

    ``http_backoff`` retries 429/5xx and connection errors 5 times, waiting 1+2+4+8+8 s: it wraps ``/preupload``,
    downloads, and the ``/commit`` POST of ``upload_folder`` (whose hf_xet pipeline sends it with
    ``retry_on_error=True``). Only the ``time`` module seen by ``huggingface_hub.utils._http`` is replaced.
    """
    from huggingface_hub.utils import _http

    fake = _NoSleepTime()
    monkeypatch.setattr(_http, "time", fake)
    return fake.sleeps
