"""A small Hub-compatible HTTP server (stdlib only) for running the real huggingface_hub client in tests.

It answers the requests listed in shared/reference/hub-protocol.md from a `HubState`
(tests/hub_store.py): repo creation, preupload, LFS batch + PUT, NDJSON commits, repo info, tree,
refs, commits, branches and `resolve` downloads with Range. Auth works like the Hub's: an unknown
token is a 401 "Invalid credentials", a private repo is invisible (401/404 RepoNotFound) to anyone
but its owner, a gated repo's files need the owner's or a granted user's token. `drop_connection`
makes the server hang up on the Nth request of one kind, to test retries and atomic pushes.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hub_store import HubHTTPError, HubState, Repo, wants_lfs

_API = r"/api/models/(?P<repo>[^/]+/[^/]+)"
#: (methods, path regex, handler method name). Matched against the raw (still quoted) path.
ROUTES: tuple[tuple[str, re.Pattern, str], ...] = tuple(
    (methods, re.compile(pattern + r"\Z"), name)
    for methods, pattern, name in (
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", _API + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", _API + r"/branch/(?P<rev>[^/]+)", "create_branch"),
        ("GET", _API + r"/refs", "refs"),
        ("GET", _API + r"/commits/(?P<rev>[^/]+)", "commits"),
        ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    )
)
#: Request kinds `drop_connection` can target: the routes' handler names.
FAULT_KINDS = frozenset(name for _, _, name in ROUTES)


@dataclass
class _Fault:
    kind: str
    nth: int
    times: int
    seen: int = 0

    def hit(self, kind: str) -> bool:
        if kind != self.kind:
            return False
        self.seen += 1
        return self.nth <= self.seen < self.nth + self.times


class _DropConnection(Exception):
    """Raised inside a handler to hang up without answering."""


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HubHTTPServer"

    # ---- plumbing -------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_GET

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        """Silence the stdlib's stderr log; requests are recorded (without headers) in `state.requests`."""

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self._raw_body = None  # one handler object serves every request of a kept-alive connection
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        state = self.server.state
        with state.lock:
            state.requests.append((self.command, url.path))
        try:
            for methods, pattern, name in ROUTES:
                match = pattern.match(url.path)
                if match and self.command in methods.split():
                    if self.server.should_drop(name):
                        raise _DropConnection
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    getattr(self, f"_h_{name}")(**params)
                    return
            raise HubHTTPError(404, None, f"no route for {self.command} {url.path}")
        except _DropConnection:
            self._hang_up()
        except HubHTTPError as err:
            self._send_error(err)

    def _hang_up(self) -> None:
        """Read part of the body (the upload is under way), then close the socket with no answer."""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(max(1, length // 2))
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _body(self) -> bytes:
        """The request body, read once (chunked or Content-Length) and kept for later calls."""
        if getattr(self, "_raw_body", None) is None:
            self._raw_body = self._read_body()
        return self._raw_body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> dict:
        raw = self._body()
        return json.loads(raw) if raw else {}

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", (headers or {}).get("Content-Length", str(len(body))))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, payload: object, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _send_error(self, err: HubHTTPError) -> None:
        if self.command != "HEAD":
            self._body()  # drain, so a kept-alive connection stays in sync
        headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers, head=self.command == "HEAD")

    # ---- auth -----------------------------------------------------------------------------
    def _user(self) -> str | None:
        """The caller's user name, None without a token; an unknown token is a 401 like on the Hub."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        user = self.server.state.tokens.get(auth[len("Bearer "):])
        if user is None:
            raise HubHTTPError(401, None, "Invalid credentials in Authorization header")
        return user

    def _readable(self, repo_id: str) -> Repo:
        user = self._user()
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubHTTPError(401 if user is None else 404, "RepoNotFound", "Repository not found")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        repo = self._readable(repo_id)
        user = self._user()
        if user != repo.owner:
            status = 401 if user is None else 403
            raise HubHTTPError(status, None, f"You don't have the rights to write to {repo_id}")
        return repo

    # ---- repos, branches, info ------------------------------------------------------------
    def _h_whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubHTTPError(401, None, "Invalid credentials in Authorization header")
        self._send_json({"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def _h_create_repo(self) -> None:
        body, user = self._json_body(), self._user()
        owner = body.get("organization") or user
        if user is None or owner != user:
            raise HubHTTPError(401 if user is None else 403, None, f"You don't have the rights to create a repo under {owner}")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo_id = f"{owner}/{body['name']}"
        url = f"{self.server.base_url}/{repo_id}"
        try:
            self.server.state.create_repo(repo_id, owner, private=private)
        except HubHTTPError as err:
            err.extra["url"] = url  # the Hub's 409 names the existing repo; exist_ok=True reads it
            raise
        self._send_json({"url": url, "name": repo_id})

    def _h_validate_yaml(self) -> None:
        self._json_body()
        self._send_json({"errors": [], "warnings": []})

    def _h_create_branch(self, repo: str, rev: str) -> None:
        body = self._json_body()
        self.server.state.create_branch(self._writable(repo), rev, body.get("startingPoint"))
        self._send_json({})

    def _h_repo_info(self, repo: str, rev: str = "main") -> None:
        r = self._readable(repo)
        commit = r.resolve(rev)
        self._send_json({
            "id": r.repo_id, "author": r.owner, "sha": commit.oid, "private": r.private,
            "gated": "manual" if r.gated else False, "disabled": False, "lastModified": commit.date,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)], "tags": [],
        })

    def _h_refs(self, repo: str) -> None:
        r = self._readable(repo)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in sorted(r.branches.items())]
        self._send_json({"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def _h_commits(self, repo: str, rev: str) -> None:
        r = self._readable(repo)
        self._send_json([
            {"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": r.owner}], "date": c.date}
            for c in r.history(rev)
        ])

    def _h_tree(self, repo: str, rev: str, path: str = "") -> None:
        files = self._readable(repo).resolve(rev).files
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        base = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for name in sorted(files):
            if not name.startswith(base):
                continue
            parts = name[len(base):].split("/")
            if recursive:
                folders.update(base + "/".join(parts[: i + 1]) for i in range(len(parts) - 1))
                entries.append(files[name].tree_entry(name))
            elif len(parts) == 1:
                entries.append(files[name].tree_entry(name))
            else:
                folders.add(base + parts[0])
        if base and not entries and not folders:
            raise HubHTTPError(404, "EntryNotFound", f"{path} does not exist at {rev}")
        folder_entries = [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
        self._send_json(folder_entries + entries)

    # ---- uploads --------------------------------------------------------------------------
    def _h_preupload(self, repo: str, rev: str) -> None:
        body, r = self._json_body(), self._writable(repo)
        files = r.resolve(rev).files
        out = []
        for entry in body.get("files", []):
            path, existing = entry["path"], files.get(entry["path"])
            lfs = self.server.lfs and wants_lfs(path, entry["size"], base64.b64decode(entry.get("sample", "")))
            oid = existing.upload_oid if existing is not None and existing.lfs == lfs else None
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": out})

    def _h_lfs_batch(self, repo: str) -> None:
        body, state = self._json_body(), self.server.state
        self._writable(repo)
        objects = []
        with state.lock:
            for obj in body.get("objects", []):
                stored = state.lfs_objects.get(obj["oid"])
                if stored is not None and len(stored) == obj["size"]:
                    objects.append({"oid": obj["oid"], "size": obj["size"]})  # already there: no action
                    continue
                state.pending_uploads.add(obj["oid"])
                href = f"{self.server.base_url}/lfs-upload/{obj['oid']}"
                objects.append({"oid": obj["oid"], "size": obj["size"], "actions": {"upload": {"href": href}}})
        self._send_json({"transfer": "basic", "objects": objects})

    def _h_lfs_put(self, oid: str) -> None:
        data, state = self._body(), self.server.state
        if oid not in state.pending_uploads:
            raise HubHTTPError(403, None, f"no upload was granted for {oid}")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubHTTPError(400, None, f"content does not hash to {oid}")
        with state.lock:
            state.lfs_objects[oid] = data
            state.pending_uploads.discard(oid)
        self._send(200, b"")

    def _h_commit(self, repo: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        r = self._writable(repo)
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        operations = [line for line in lines if line["key"] != "header"]
        commit = self.server.state.commit(r, rev, header, operations)
        self._send_json({"commitUrl": f"{self.server.base_url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid, "success": True})

    # ---- downloads ------------------------------------------------------------------------
    def _h_resolve(self, repo: str, rev: str, path: str) -> None:
        r = self._readable(repo)
        commit = r.resolve(rev)
        stored = commit.files.get(path)
        if stored is None:
            raise HubHTTPError(404, "EntryNotFound", f"{path} does not exist at {rev}")
        user = self._user()
        if r.gated and user not in {r.owner, *r.granted}:
            status = 401 if user is None else 403
            raise HubHTTPError(status, "GatedRepo", f"Access to model {repo} is restricted")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.upload_oid}"', "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.data))})
        data, status = stored.data, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start, end = int(match[1]), int(match[2]) if match[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, head=self.command == "HEAD")


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    base_url: str
    faults: list[_Fault]
    lfs: bool

    def should_drop(self, kind: str) -> bool:
        with self.state.lock:
            return any([fault.hit(kind) for fault in self.faults])  # list: every fault counts the request


class HubServer:
    """The test Hub on 127.0.0.1: `with HubServer(tokens={"tok": "me"}) as hub: ... hub.url ...`.

    `lfs=False` makes every upload "regular" (inline in the commit): for a client that would send LFS
    files through Xet, i.e. one not started with `HF_HUB_DISABLE_XET=1` (this server does not speak Xet).
    """

    def __init__(
        self, tokens: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0, *, lfs: bool = True
    ) -> None:
        self.state = HubState(tokens)
        self._httpd = _HubHTTPServer((host, port), HubRequestHandler)
        self._httpd.state = self.state
        self._httpd.faults = []
        self._httpd.lfs = lfs
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._httpd.base_url = self.url
        self._thread: threading.Thread | None = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_connection(self, kind: str, nth: int = 1, times: int = 1) -> None:
        """Hang up, without answering, on requests nth .. nth+times-1 of `kind` (a route name, e.g. "lfs_put")."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown request kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        with self.state.lock:
            self._httpd.faults.append(_Fault(kind, nth, times))

    def clear_faults(self) -> None:
        with self.state.lock:
            self._httpd.faults.clear()

    def count(self, method: str, path_regex: str) -> int:
        """How many requests matched `method` and `path_regex` so far."""
        with self.state.lock:
            return sum(1 for m, p in self.state.requests if m == method and re.search(path_regex, p))
