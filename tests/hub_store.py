"""In-memory state of the test Hub: repos with real commits (40-hex oids), branches, LFS objects, tokens.

Kept apart from the HTTP layer (`tests/hub_server.py`) so tests can seed and inspect repos directly:
a commit is applied all at once under one lock, which is what lets tests check "one commit or none".
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import threading
import time
from dataclasses import dataclass, field

#: File suffixes the Hub's default `.gitattributes` tracks with LFS.
LFS_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".png", ".model")
#: Above this size the Hub stores a file with LFS whatever its name.
LFS_MIN_SIZE = 10 * 1024 * 1024
INITIAL_GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


class HubHTTPError(Exception):
    """An error answer: status, `X-Error-Code` (what the client maps to an exception) and a message."""

    def __init__(self, status: int, error_code: str | None, message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message
        self.extra = extra or {}  # more keys for the JSON body


def git_blob_oid(data: bytes) -> str:
    """Git's blob id (sha1 of `blob <len>\\0<data>`): what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in git for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's preupload rule, simplified: LFS by suffix, by size, or for binary content."""
    if size == 0:
        return False
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit; `oid` is its git id, `sha256` its content hash (the LFS oid)."""

    data: bytes
    lfs: bool
    sha256: str
    oid: str

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> "StoredFile":
        sha256 = hashlib.sha256(data).hexdigest()
        oid = git_blob_oid(lfs_pointer(sha256, len(data)) if lfs else data)
        return cls(data, lfs, sha256, oid)

    @property
    def upload_oid(self) -> str:
        """The oid preupload reports, which the client compares to its own to skip unchanged files."""
        return self.sha256 if self.lfs else self.oid

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.data), "oid": self.oid}
        if self.lfs:
            pointer_size = len(lfs_pointer(self.sha256, len(self.data)))
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": pointer_size}
        return entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, StoredFile]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    """A model repo. `granted` lists users (besides the owner) who may download a gated repo."""

    repo_id: str
    owner: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch name or a full commit oid -> the commit; 404 RevisionNotFound otherwise."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return self.commits[oid]

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        out, commit = [], self.resolve(revision)
        while True:
            out.append(commit)
            if commit.parent is None:
                return out
            commit = self.commits[commit.parent]


class HubState:
    """Everything the server knows. All mutations take `lock`, so each commit is atomic."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.lock = threading.RLock()
        self.tokens: dict[str, str] = dict(tokens or {})  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.pending_uploads: set[str] = set()  # oids the batch endpoint handed out an upload URL for
        self.requests: list[tuple[str, str]] = []  # (method, path): never headers, so never tokens
        self._counter = itertools.count()

    def create_repo(self, repo_id: str, owner: str, *, private: bool = False, gated: bool = False) -> Repo:
        """A new repo with the Hub's initial commit (a `.gitattributes`) on `main`."""
        with self.lock:
            if repo_id in self.repos:
                raise HubHTTPError(409, None, "You already created this model repo")
            repo = Repo(repo_id, owner, private=private, gated=gated)
            self.repos[repo_id] = repo
            files = {".gitattributes": StoredFile.make(INITIAL_GITATTRIBUTES, lfs=False)}
            self._add_commit(repo, "main", None, files, "initial commit", "")
            return repo

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubHTTPError(409, None, f"Branch {branch} already exists")
            repo.branches[branch] = repo.resolve(starting_point or "main").oid

    def commit(self, repo: Repo, branch: str, header: dict, operations: list[dict]) -> Commit:
        """Apply NDJSON commit operations to the head of `branch` as one new commit, or change nothing."""
        with self.lock:
            if branch not in repo.branches:
                raise HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {branch} (commits go to a branch)")
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            if parent and parent != head.oid:
                raise HubHTTPError(412, None, f"parentCommit {parent} is not the head of {branch}")
            files = dict(head.files)
            for op in operations:
                self._apply(files, op["key"], op["value"])
            return self._add_commit(repo, branch, head.oid, files, header.get("summary", ""), header.get("description", ""))

    def _apply(self, files: dict[str, StoredFile], key: str, value: dict) -> None:
        path = value["path"]
        if key == "file":
            files[path] = StoredFile.make(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            data = self.lfs_objects.get(value["oid"])
            if data is None or len(data) != value["size"]:
                raise HubHTTPError(422, None, f"LFS object {value['oid']} for {path} was never uploaded")
            files[path] = StoredFile.make(data, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubHTTPError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
        elif key == "deletedFolder":
            for name in [n for n in files if n.startswith(path.rstrip("/") + "/")]:
                del files[name]
        else:
            raise HubHTTPError(400, None, f"unknown commit operation {key!r}")

    def _add_commit(self, repo: Repo, branch: str, parent: str | None, files: dict, title: str, message: str) -> Commit:
        tree = "\n".join(f"{path} {f.oid}" for path, f in sorted(files.items()))
        seed = f"{parent}\n{tree}\n{title}\n{next(self._counter)}".encode()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, files, title, message, date)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit
