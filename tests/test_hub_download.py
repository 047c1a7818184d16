"""`bridge import <hub id>`'s download (`resolve_source`): only the needed files, and one clear line per failure."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download

from bridge.errors import BridgeError
from bridge.hub import resolve_source
from bridge.apps.push import push_to_hub
from tests.hub_fixture import OTHER_TOKEN, TOKEN, USER, logits_of, point_hub_client_at
from tests.hub_server import HubServer

REPO = f"{USER}/tiny-llama"


@pytest.fixture
def published(hub, tiny_llama) -> Path:
    """REPO on the test Hub: the tiny model, its card, and files a conversion does not need."""
    push_to_hub(tiny_llama, REPO, token=TOKEN)
    api = HfApi(token=TOKEN)
    for name, data in (("pytorch_model.bin", b"\0" * 64), ("optimizer.pt", b"\0" * 64), ("logs/train.log", b"x")):
        api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id=REPO)
    return tiny_llama


def _downloaded(hub: HubServer) -> set[str]:
    return {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in hub.state.requests if m == "GET" and "/resolve/" in p}


def test_downloads_only_what_conversion_needs(hub, published):
    folder = resolve_source(REPO)
    assert torch.equal(logits_of(folder), logits_of(published))
    assert _downloaded(hub) == {"config.json", "generation_config.json", "model.safetensors", "README.md"}
    assert not (folder / "pytorch_model.bin").exists() and not (folder / "optimizer.pt").exists()


def test_revision_selects_a_branch(hub, published, tmp_path):
    from tests.hub_fixture import save_tiny_llama

    other = save_tiny_llama(tmp_path / "other", seed=1)
    push_to_hub(other, REPO, token=TOKEN, revision="exp-3")
    assert torch.equal(logits_of(resolve_source(REPO, revision="exp-3")), logits_of(other))
    assert torch.equal(logits_of(resolve_source(REPO)), logits_of(published))


def test_missing_repo(hub):
    with pytest.raises(BridgeError, match=f"no repo {USER}/absent on {hub.url} .*if it is private, pass --token"):
        resolve_source(f"{USER}/absent")
    with pytest.raises(BridgeError, match="that your token can see"):
        resolve_source(f"{USER}/absent", token=TOKEN)


def test_private_repo_needs_the_owners_token(hub, published):
    push_to_hub(published, f"{USER}/secret", token=TOKEN, private=True)
    with pytest.raises(BridgeError, match="that your token can see"):
        resolve_source(f"{USER}/secret", token=OTHER_TOKEN)
    with pytest.raises(BridgeError, match="rejected the token"):
        resolve_source(f"{USER}/secret", token="hf_wrong")
    assert resolve_source(f"{USER}/secret", token=TOKEN).is_dir()  # (after this, the local cache would serve)


def test_gated_repo(hub, published):
    hub.state.repos[REPO].gated = True
    with pytest.raises(BridgeError, match=f"{REPO} is gated: accept its terms at {hub.url}/{REPO}, then pass --token"):
        resolve_source(REPO)
    with pytest.raises(BridgeError, match="is gated and your token has no access"):
        resolve_source(REPO, token=OTHER_TOKEN)
    hub.state.repos[REPO].granted.add("someone-else")
    assert resolve_source(REPO, token=OTHER_TOKEN).is_dir()


def test_missing_revision(hub, published):
    with pytest.raises(BridgeError, match=f"{REPO} has no revision 'nope'; give an existing branch"):
        resolve_source(REPO, revision="nope")


def test_no_network_nothing_cached_then_cached(hub, published, tmp_path, monkeypatch):
    with HubServer() as dead:
        dead_url = dead.url  # a port that refuses connections once this server stops
    point_hub_client_at(dead_url, tmp_path / "hf_home", monkeypatch)  # same cache as the fixture's: empty so far
    with pytest.raises(BridgeError, match=f"cannot reach {dead_url} to get {REPO}@main and it is not"):
        resolve_source(REPO)
    point_hub_client_at(hub.url, tmp_path / "hf_home", monkeypatch)
    folder = resolve_source(REPO)
    point_hub_client_at(dead_url, tmp_path / "hf_home", monkeypatch)
    assert resolve_source(REPO) == folder  # offline, the cached snapshot serves


def test_offline_mode_with_nothing_cached(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BridgeError, match="HF_HUB_OFFLINE is set and"):
        resolve_source(REPO)


def test_repo_without_safetensors(hub, tmp_path):
    api = HfApi(token=TOKEN)
    api.create_repo(f"{USER}/bins")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=f"{USER}/bins")
    api.upload_file(path_or_fileobj=b"\0" * 8, path_in_repo="pytorch_model.bin", repo_id=f"{USER}/bins")
    with pytest.raises(BridgeError, match="has no \\*.safetensors weights; bridge converts"):
        resolve_source(f"{USER}/bins")


def test_local_sources_need_no_hub(tmp_path):
    assert resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(BridgeError, match="give a local HF folder or a Hub id"):
        resolve_source("no/such/folder")


def test_import_from_hub_branch_and_push_back(hub, published, tmp_path):
    """`bridge import me/x --revision exp-3 --tp 2`, export, push: same logits; the card names its base."""
    from bridge.api import export_hf, import_hf
    from bridge.layout import ParallelLayout

    push_to_hub(published, REPO, token=TOKEN, revision="exp-3")
    commit = HfApi(token=TOKEN).repo_info(REPO, revision="exp-3").sha
    ckpt = import_hf(REPO, tmp_path / "r1", ParallelLayout(tp=2), revision="exp-3", token=TOKEN)
    assert torch.equal(logits_of(export_hf(ckpt, tmp_path / "r1-hf")), logits_of(published))
    push_to_hub(ckpt, f"{USER}/finetuned", token=TOKEN)
    text = Path(hf_hub_download(f"{USER}/finetuned", "README.md", token=TOKEN)).read_text()
    assert f"base_model: {REPO}" in text and f"at revision `exp-3`, commit `{commit}`" in text
