"""The test Hub itself, driven by the real huggingface_hub client: commits, branches, auth, errors, faults.

If these pass, the push/download tests exercise the client's real code paths, not a mock's.
"""
from __future__ import annotations

import re
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_fixture import OTHER_TOKEN, TOKEN, USER

SHA = re.compile(r"[0-9a-f]{40}")


def _folder(tmp_path: Path, weights: bytes = b"\x00\x01" * 600) -> Path:
    folder = tmp_path / "up"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "sub" / "model.safetensors").write_bytes(weights)
    return folder


def test_commits_are_real_and_files_round_trip(hub, tmp_path):
    api = HfApi(token=TOKEN)
    api.create_repo(f"{USER}/m")
    first = api.repo_info(f"{USER}/m").sha
    info = api.upload_folder(repo_id=f"{USER}/m", folder_path=_folder(tmp_path), commit_message="add model")
    assert SHA.fullmatch(first) and SHA.fullmatch(info.oid) and info.oid != first
    assert api.repo_info(f"{USER}/m").sha == info.oid
    assert [c.title for c in api.list_repo_commits(f"{USER}/m")] == ["add model", "initial commit"]
    tree = {f.path: f for f in api.list_repo_tree(f"{USER}/m", recursive=True) if hasattr(f, "size")}
    assert tree["sub/model.safetensors"].lfs is not None and tree["config.json"].lfs is None
    local = Path(snapshot_download(f"{USER}/m", token=TOKEN))
    assert (local / "sub" / "model.safetensors").read_bytes() == (tmp_path / "up/sub/model.safetensors").read_bytes()
    assert hub.count("PUT", r"^/lfs-upload/") == 1  # the LFS file went through the LFS batch + PUT path


def test_same_content_again_makes_no_commit(hub, tmp_path):
    api = HfApi(token=TOKEN)
    api.create_repo(f"{USER}/m")
    folder = _folder(tmp_path)
    first = api.upload_folder(repo_id=f"{USER}/m", folder_path=folder, commit_message="one")
    again = api.upload_folder(repo_id=f"{USER}/m", folder_path=folder, commit_message="two")
    assert again.oid == first.oid
    assert len(api.list_repo_commits(f"{USER}/m")) == 2


def test_branches_are_independent(hub, tmp_path):
    api = HfApi(token=TOKEN)
    api.create_repo(f"{USER}/m")
    main_head = api.repo_info(f"{USER}/m").sha
    api.create_branch(f"{USER}/m", branch="exp-3")
    api.create_branch(f"{USER}/m", branch="exp-3", exist_ok=True)  # 409 accepted
    info = api.upload_folder(repo_id=f"{USER}/m", folder_path=_folder(tmp_path), revision="exp-3", commit_message="x")
    assert api.repo_info(f"{USER}/m", revision="exp-3").sha == info.oid
    assert api.repo_info(f"{USER}/m").sha == main_head
    assert {b.name for b in api.list_repo_refs(f"{USER}/m").branches} == {"main", "exp-3"}
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(f"{USER}/m", revision="nope")


def test_private_repo_auth(hub, tmp_path):
    HfApi(token=TOKEN).create_repo(f"{USER}/secret", private=True)
    assert HfApi(token=TOKEN).repo_info(f"{USER}/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).repo_info(f"{USER}/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=OTHER_TOKEN).repo_info(f"{USER}/secret")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").repo_info(f"{USER}/secret")
    assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as err:  # someone else's namespace
        HfApi(token=OTHER_TOKEN).create_repo(f"{USER}/other")
    assert err.value.response.status_code == 403


def test_missing_entries_and_ranges(hub, tmp_path):
    api = HfApi(token=TOKEN)
    api.create_repo(f"{USER}/m")
    api.upload_folder(repo_id=f"{USER}/m", folder_path=_folder(tmp_path, weights=bytes(range(256)) * 8), commit_message="x")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(f"{USER}/m", "nope.json", token=TOKEN, cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{USER}/absent", "config.json", token=TOKEN, cache_dir=tmp_path / "c")
    r = httpx2.get(f"{hub.url}/{USER}/m/resolve/main/sub/model.safetensors", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == bytes(range(10, 20))
    assert SHA.fullmatch(r.headers["X-Repo-Commit"]) and r.headers["Content-Range"] == "bytes 10-19/2048"


def test_dropped_lfs_upload_is_retried_by_the_client(hub, tmp_path):
    api = HfApi(token=TOKEN)
    api.create_repo(f"{USER}/m")
    hub.drop_connection("lfs_put", nth=1)
    info = api.upload_folder(repo_id=f"{USER}/m", folder_path=_folder(tmp_path), commit_message="x")
    assert hub.count("PUT", r"^/lfs-upload/") == 2
    assert api.repo_info(f"{USER}/m").sha == info.oid


def test_a_commit_naming_a_missing_lfs_object_changes_nothing(hub):
    api = HfApi(token=TOKEN)
    api.create_repo(f"{USER}/m")
    head = api.repo_info(f"{USER}/m").sha
    body = (
        b'{"key": "header", "value": {"summary": "half"}}\n'
        b'{"key": "file", "value": {"path": "a.txt", "content": "aGk=", "encoding": "base64"}}\n'
        b'{"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "' + b"0" * 64 + b'", "size": 3}}\n'
    )
    r = httpx2.post(f"{hub.url}/api/models/{USER}/m/commit/main", content=body,
                    headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"})
    assert r.status_code == 422
    assert api.repo_info(f"{USER}/m").sha == head
    assert api.list_repo_files(f"{USER}/m") == [".gitattributes"]
