"""A small Hub-compatible HTTP server for the Hub tests: stdlib ``http.server`` in a thread on 127.0.0.1.

Nothing on PyPI serves the Hub's write API locally for ``huggingface_hub`` 2.x (``hf-local-hub`` 3.0.0 ships no server
binary, ``olah`` is a read-only mirror), and the build machines cannot reach the real Hub.  This server implements only
the endpoints that ``huggingface_hub`` 2.4.0 calls for what the package does (written from its client code and the
git-lfs batch API, not from any server implementation):

- ``POST /api/repos/create`` (409 with the repo url when it exists), ``POST /api/validate-yaml``;
- ``POST /api/models/{repo}/preupload/{rev}`` (``.safetensors`` and images go to LFS, the rest inline);
- ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT`` upload + ``POST`` verify (the "basic" transfer; set
  ``HF_HUB_DISABLE_XET=1``, Xet is not implemented);
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, base64 ``file``, ``lfsFile``, ``deletedFile``,
  ``deletedFolder``; ``create_pr=1`` opens ``refs/pr/N``), ``POST /api/models/{repo}/branch/{name}``;
- ``GET /api/models/{repo}[/revision/{rev}]``, ``/tree/{rev}[/{path}]``, ``/refs``;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit``, ``X-Linked-Etag``/``X-Linked-Size``
  (LFS) and ``Content-Length``; errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) so the client raises its usual exception types.

Private repos answer only to the token that created them (as a missing repo otherwise, like the Hub).  Every request
and every commit is recorded (``server.requests``, ``server.commits``) so tests can assert what the client sent.
Model repos only; no tags, no pagination, no Xet.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

LFS_SUFFIXES = (".safetensors", ".png", ".jpg", ".jpeg", ".webp")
DEFAULT_USER = "fake-user"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
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
        """Git id of what git stores: the pointer file for LFS files, the content otherwise."""
        return git_blob_sha1(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)


@dataclass
class Commit:
    sha: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    owner_token: str | None
    refs: dict[str, str] = field(default_factory=dict)  # "main", "v1", "refs/pr/1" -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    pr_count: int = 0

    def resolve(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{40}", revision):
            sha = revision
        return self.commits.get(sha) if sha else None


@dataclass
class CommitRecord:
    """What a test can check about one commit the client sent."""

    repo_id: str
    revision: str
    ref: str
    create_pr: bool
    summary: str
    description: str
    paths: list[str]
    deleted: list[str]
    sha: str
    authorization: str | None
    pr_url: str | None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHubServer:
    """Start with ``with FakeHubServer() as hub:``; ``hub.url`` is the endpoint to put in ``HF_ENDPOINT``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization header)
        self.commits: list[CommitRecord] = []
        self.fail_commits = False  # tests set it to make the commit endpoint answer 500
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the fake Hub is not running")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FakeHubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> FakeHubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------------------------------------------
    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """The content of ``path`` at ``revision`` (KeyError if absent)."""
        commit = self.repos[repo_id].resolve(revision)
        return commit.files[path].data

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        return dict(self.repos[repo_id].resolve(revision).files)

    # -- state changes (called under the lock) -----------------------------------------------------------------------
    def _new_sha(self, *parts: str) -> str:
        return hashlib.sha1("\x00".join([*parts, str(next(self._counter))]).encode()).hexdigest()

    def _create_repo(self, repo_id: str, private: bool, token: str | None) -> Repo:
        repo = Repo(repo_id=repo_id, private=private, owner_token=token)
        sha = self._new_sha(repo_id, "initial commit")
        repo.commits[sha] = Commit(
            sha, None, "initial commit", "", {".gitattributes": StoredFile(GITATTRIBUTES, False)}, _now()
        )
        repo.refs["main"] = sha
        self.repos[repo_id] = repo
        return repo


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: FakeHubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
        pass

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        hub = self.server_state
        body = b"" if method in ("GET", "HEAD") else self._read_body()
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = [unquote(s) for s in split.path.strip("/").split("/")]
        authorization = self.headers.get("Authorization")
        with hub._lock:
            hub.requests.append((method, split.path, authorization))
        try:
            with hub._lock:
                _route(self, hub, method, segments, query, body, _bearer(authorization))
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            payload = json.dumps({"error": err.message}).encode()
            self._send(err.status, payload, headers, head=method == "HEAD")
        except Exception as err:  # a malformed request: answer 500 instead of dropping the connection
            self._send(500, json.dumps({"error": f"{type(err).__name__}: {err}"}).encode(), head=method == "HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")


# -- routing -------------------------------------------------------------------------------------------------------------
def _route(
    h: _Handler, hub: FakeHubServer, method: str, seg: list[str], query: dict[str, str], body: bytes, token: str | None
) -> None:
    if seg[:2] == ["api", "repos"] and seg[2:] == ["create"] and method == "POST":
        return _create_repo(h, hub, json.loads(body), token)
    if seg[:2] == ["api", "validate-yaml"] and method == "POST":
        return _validate_yaml(h, json.loads(body))
    if seg[:1] == ["__lfs__"] and len(seg) == 2 and method == "PUT":
        return _lfs_put(h, hub, seg[1], body)
    if seg == ["__lfs_verify__"] and method == "POST":
        payload = json.loads(body)
        if hub.lfs_objects.get(payload["oid"]) is None or len(hub.lfs_objects[payload["oid"]]) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
        return h._json(200, {"ok": True})
    if seg[:2] == ["api", "models"] and len(seg) >= 4:
        return _api(h, hub, method, seg[2:], query, body, token)
    if len(seg) >= 5 and seg[-4:] == ["info", "lfs", "objects", "batch"] and method == "POST":
        repo_id = "/".join(seg[:-4]).removesuffix(".git")
        return _lfs_batch(h, hub, _repo(hub, repo_id, token), json.loads(body))
    if "resolve" in seg and method in ("GET", "HEAD"):
        i = seg.index("resolve")
        return _resolve(h, hub, "/".join(seg[:i]), seg[i + 1], "/".join(seg[i + 2 :]), token, method == "HEAD")
    raise HubError(404, f"no such endpoint: {method} /{'/'.join(seg)}")


def _repo(hub: FakeHubServer, repo_id: str, token: str | None) -> Repo:
    repo = hub.repos.get(repo_id)
    if repo is None or (repo.private and token != repo.owner_token):
        raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
    return repo


def _commit_at(repo: Repo, revision: str) -> Commit:
    commit = repo.resolve(revision)
    if commit is None:
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    return commit


def _create_repo(h: _Handler, hub: FakeHubServer, payload: dict, token: str | None) -> None:
    if token is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    if payload.get("type", "model") != "model":
        raise HubError(400, "the fake Hub only serves model repos")
    repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
    url = f"{h.server_state.url}/{repo_id}"
    if repo_id in hub.repos:  # the client reads the url from the 409 body when exist_ok=True
        return h._json(409, {"error": "You already created this model repo", "url": url})
    # huggingface_hub 1.3 (the floor) sends `"private": true`; later releases send `"visibility": "private"`.
    private = payload.get("visibility") == "private" or payload.get("private") is True
    hub._create_repo(repo_id, private, token)
    h._json(200, {"url": url, "name": repo_id, "id": repo_id})


def _validate_yaml(h: _Handler, payload: dict) -> None:
    content = payload.get("content", "")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
    if match is None:
        return h._json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return h._json(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
    if not isinstance(data, dict):
        return h._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []})
    return h._json(200, {"errors": [], "warnings": []})


def _api(
    h: _Handler, hub: FakeHubServer, method: str, rest: list[str], query: dict[str, str], body: bytes, token: str | None
) -> None:
    # Every repo here is "namespace/name" (create_repo puts a bare name under DEFAULT_USER).
    repo_id, action, args = "/".join(rest[:2]), (rest[2] if len(rest) > 2 else None), rest[3:]
    repo = _repo(hub, repo_id, token)
    if action in (None, "revision") and method == "GET":
        commit = _commit_at(repo, args[0] if action == "revision" else "main")
        return h._json(200, _model_info(repo, commit))
    if action == "refs" and method == "GET":
        ref = lambda name: {"name": name, "ref": f"refs/heads/{name}", "targetCommit": repo.refs[name]}  # noqa: E731
        prs = [{"name": n, "ref": n, "targetCommit": s} for n, s in repo.refs.items() if n.startswith("refs/pr/")]
        return h._json(
            200,
            {
                "branches": [ref(n) for n in repo.refs if not n.startswith("refs/")],
                "converts": [],
                "tags": [],
                **({"pullRequests": prs} if query.get("include_prs") else {}),
            },
        )
    if action == "tree" and method == "GET":
        commit = _commit_at(repo, args[0])
        return h._json(200, _tree(commit, "/".join(args[1:]), query.get("recursive") in ("True", "true", "1")))
    if token is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    if action == "preupload" and method == "POST":
        commit = repo.resolve(args[0])
        if commit is None and query.get("create_pr") != "1":
            raise HubError(404, f"Invalid rev id: {args[0]}", "RevisionNotFound")
        files = []
        for entry in json.loads(body)["files"]:
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] > 10 * 1024 * 1024
            old = commit.files.get(entry["path"]) if commit else None
            oid = None if old is None else (old.sha256 if old.lfs else git_blob_sha1(old.data))
            files.append(
                {"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return h._json(200, {"files": files})
    if action == "branch" and method == "POST":
        name = "/".join(args)
        if name in repo.refs:
            raise HubError(409, f"Reference refs/heads/{name} already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.refs[name] = _commit_at(repo, start).sha
        return h._json(200, {"ok": True})
    if action == "commit" and method == "POST":
        return _commit(h, hub, repo, args[0], query.get("create_pr") == "1", body, token)
    raise HubError(404, f"no such endpoint: {method} /api/models/{'/'.join(rest)}")


def _model_info(repo: Repo, commit: Commit) -> dict:
    card = _card_data(commit)
    return {
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.sha,
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "lastModified": commit.date,
        "createdAt": commit.date,
        "tags": list(card.get("tags") or []),
        "library_name": card.get("library_name"),
        "cardData": card or None,
        "siblings": [{"rfilename": p} for p in sorted(commit.files)],
    }


def _card_data(commit: Commit) -> dict:
    readme = commit.files.get("README.md")
    match = readme and re.match(rb"^---\s*\n(.*?)\n---\s*\n", readme.data, re.S)
    return (yaml.safe_load(match.group(1).decode()) or {}) if match else {}


def _tree(commit: Commit, path: str, recursive: bool) -> list[dict]:
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    entries, folders = [], set()
    for name, stored in sorted(commit.files.items()):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if (recursive or depth == 1) and folder not in folders:
                folders.add(folder)
                entries.append({"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
        if recursive or len(parts) == 1:
            entry = {"type": "file", "path": name, "size": len(stored.data), "oid": stored.git_oid}
            if stored.lfs:
                pointer = lfs_pointer(stored.sha256, len(stored.data))
                entry["lfs"] = {"oid": stored.sha256, "size": len(stored.data), "pointerSize": len(pointer)}
            entries.append(entry)
    if prefix and not entries:
        raise HubError(404, f"{path} does not exist at {commit.sha}", "EntryNotFound")
    return entries


def _lfs_batch(h: _Handler, hub: FakeHubServer, repo: Repo, payload: dict) -> None:
    if payload.get("operation") != "upload":
        raise HubError(400, "the fake Hub only implements LFS uploads")
    objects = []
    for obj in payload["objects"]:
        entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if obj["oid"] not in hub.lfs_objects:
            entry["actions"] = {
                "upload": {"href": f"{hub.url}/__lfs__/{obj['oid']}"},
                "verify": {"href": f"{hub.url}/__lfs_verify__"},
            }
        objects.append(entry)
    h._send(
        200, json.dumps({"transfer": "basic", "objects": objects}).encode(), content_type="application/vnd.git-lfs+json"
    )


def _lfs_put(h: _Handler, hub: FakeHubServer, oid: str, body: bytes) -> None:
    if hashlib.sha256(body).hexdigest() != oid:
        raise HubError(400, f"uploaded content does not match sha256 {oid}")
    hub.lfs_objects[oid] = body
    h._send(200)


def _commit(
    h: _Handler, hub: FakeHubServer, repo: Repo, revision: str, create_pr: bool, body: bytes, token: str | None
) -> None:
    if hub.fail_commits:
        raise HubError(500, "commit failed (FakeHubServer.fail_commits is set)")
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "the NDJSON body must start with a header line")
    header = lines[0]["value"]
    base = _commit_at(repo, revision)
    if header.get("parentCommit") and header["parentCommit"] != base.sha:
        raise HubError(412, f"parent commit {header['parentCommit']} is not the head of {revision}")
    files = dict(base.files)
    added, deleted = [], []
    for line in lines[1:]:
        key, value = line["key"], line["value"]
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
            files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            added.append(value["path"])
        elif key == "lfsFile":
            data = hub.lfs_objects.get(value["oid"])
            if data is None:
                raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
            files[value["path"]] = StoredFile(data, True)
            added.append(value["path"])
        elif key == "deletedFile":
            if files.pop(value["path"], None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            deleted.append(value["path"])
        elif key == "deletedFolder":
            folder = value["path"].rstrip("/") + "/"
            gone = [p for p in files if p.startswith(folder)]
            for p in gone:
                del files[p]
            deleted.extend(gone)
        else:
            raise HubError(400, f"unknown commit operation {key!r}")
    sha = hub._new_sha(repo.repo_id, revision, header.get("summary", ""))
    repo.commits[sha] = Commit(sha, base.sha, header.get("summary", ""), header.get("description", ""), files, _now())
    pr_url = None
    if create_pr:
        repo.pr_count += 1
        ref = f"refs/pr/{repo.pr_count}"
        pr_url = f"{hub.url}/{repo.repo_id}/discussions/{repo.pr_count}"
    else:
        ref = revision
    repo.refs[ref] = sha
    hub.commits.append(
        CommitRecord(
            repo.repo_id,
            revision,
            ref,
            create_pr,
            header.get("summary", ""),
            header.get("description", ""),
            added,
            deleted,
            sha,
            f"Bearer {token}",
            pr_url,
        )
    )
    h._json(200, {"commitUrl": f"{hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url})


def _resolve(
    h: _Handler, hub: FakeHubServer, repo_id: str, revision: str, path: str, token: str | None, head: bool
) -> None:
    repo = _repo(hub, repo_id, token)
    commit = _commit_at(repo, revision)
    stored = commit.files.get(path)
    if stored is None:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
    headers = {
        "ETag": f'"{stored.git_oid}"',
        "X-Repo-Commit": commit.sha,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"',
    }
    if stored.lfs:
        headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.data))})
    data = stored.data
    match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
    if match and not head:
        start = int(match.group(1))
        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        return h._send(206, data[start:], headers, content_type="application/octet-stream")
    headers["Content-Length"] = str(len(data))
    h._send(200, data, headers, content_type="application/octet-stream", head=head)


# -- pointing huggingface_hub at a server --------------------------------------------------------------------------------
@contextmanager
def hub_client_environment(endpoint: str, hf_home: str | os.PathLike, offline: bool = False) -> Iterator[None]:
    """Point huggingface_hub (and the libraries that call it) at ``endpoint`` with ``hf_home`` as ``HF_HOME``, and
    restore everything on exit.

    huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` once, at import,
    into ``huggingface_hub.constants``; by the time a test runs it is imported, so the constants are patched (the
    client reads them at call time) along with the environment (for subprocesses).  Two objects captured the endpoint
    earlier and are patched too: the module-level ``HfApi`` behind ``huggingface_hub.create_repo`` /
    ``file_exists`` / ``model_info`` (used by diffusers and PEFT), and transformers' cached ``hf_api()`` (used by
    ``PeftModel.push_to_hub``).  No token from the machine is used: ``HF_TOKEN`` is unset and the token file lives in
    ``hf_home``.
    """
    import huggingface_hub.hf_api
    from huggingface_hub import constants

    home = Path(hf_home)
    cache = home / "hub"
    token_path = home / "token"
    with pytest.MonkeyPatch.context() as mp:
        env = {
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN_PATH": str(token_path),
            "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
        }
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
            mp.delenv(key, raising=False)
        if offline:
            mp.setenv("HF_HUB_OFFLINE", "1")
        patches = {
            "ENDPOINT": endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(cache),
            "HF_TOKEN_PATH": str(token_path),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "HF_HUB_OFFLINE": offline,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
        }
        for name, value in patches.items():
            mp.setattr(constants, name, value)
        mp.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
        try:
            import transformers.utils.hub as transformers_hub

            mp.setattr(transformers_hub, "_hf_api", None)
        except (ImportError, AttributeError):
            pass
        yield
