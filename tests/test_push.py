"""`bridge push` against the local test Hub: round trip with same logits, branches, auth, retries, atomicity."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download

from bridge.errors import BridgeError
from bridge.apps.push import push_to_hub
from tests.hub_fixture import OTHER_TOKEN, TOKEN, USER, logits_of

REPO = f"{USER}/tiny-llama"


def _head(repo: str = REPO, revision: str = "main") -> str:
    return HfApi(token=TOKEN).repo_info(repo, revision=revision).sha


def test_push_hf_folder_round_trip_same_logits(hub, tiny_llama):
    url = push_to_hub(tiny_llama, REPO, token=TOKEN, commit_message="first push")
    assert url.endswith("/commit/" + _head())
    local = Path(snapshot_download(REPO, token=TOKEN))
    assert torch.equal(logits_of(local), logits_of(tiny_llama))
    card = (local / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- llama" in card
    assert "base_model" not in card and "license" not in card  # nothing known about either: left out
    assert "## Training" not in card and "## Verification" not in card
    assert [c.title for c in HfApi(token=TOKEN).list_repo_commits(REPO)] == ["first push", "initial commit"]


def test_re_push_of_same_content_makes_no_commit(hub, tiny_llama):
    first = push_to_hub(tiny_llama, REPO, token=TOKEN)
    again = push_to_hub(tiny_llama, REPO, token=TOKEN)
    assert again == first
    assert len(HfApi(token=TOKEN).list_repo_commits(REPO)) == 2


def test_push_to_a_branch_leaves_main_alone(hub, tiny_llama):
    push_to_hub(tiny_llama, REPO, token=TOKEN)
    main_head = _head()
    url = push_to_hub(tiny_llama, REPO, token=TOKEN, revision="exp-3", commit_message="2k steps on corpus v2")
    assert _head() == main_head and url.endswith(_head(revision="exp-3"))
    assert HfApi(token=TOKEN).list_repo_commits(REPO, revision="exp-3")[0].title == "2k steps on corpus v2"
    local = Path(snapshot_download(REPO, revision="exp-3", token=TOKEN))
    assert 'revision="exp-3"' in (local / "README.md").read_text()


def test_new_weights_replace_stale_shards(hub, tiny_llama):
    api = HfApi(token=TOKEN)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"old", path_in_repo="model-00002-of-00002.safetensors", repo_id=REPO)
    push_to_hub(tiny_llama, REPO, token=TOKEN)
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "README.md", "config.json",
                                                 "generation_config.json", "model.safetensors"]


def test_private_repo_and_wrong_token(hub, tiny_llama, caplog):
    caplog.set_level(logging.DEBUG)
    push_to_hub(tiny_llama, REPO, token=TOKEN, private=True)
    assert hub.state.repos[REPO].private
    with pytest.raises(BridgeError, match="rejected the token") as err:
        push_to_hub(tiny_llama, REPO, token="hf_wrong_token")
    assert "\n" not in str(err.value)
    with pytest.raises(BridgeError, match=f"may not write to {USER}/other"):
        push_to_hub(tiny_llama, f"{USER}/other", token=OTHER_TOKEN)
    with pytest.raises(BridgeError, match="pass --token, set HF_TOKEN"):
        push_to_hub(tiny_llama, REPO)  # no token anywhere (the fixture clears HF_TOKEN and the login cache)
    assert TOKEN not in caplog.text and "hf_wrong_token" not in caplog.text


def test_token_from_hf_token_env(hub, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push_to_hub(tiny_llama, REPO).endswith(_head())


def test_dropped_connection_mid_upload_is_retried(hub, tiny_llama):
    hub.drop_connection("lfs_put", nth=1)
    push_to_hub(tiny_llama, REPO, token=TOKEN)
    assert hub.count("PUT", r"^/lfs-upload/") == 2
    local = Path(snapshot_download(REPO, token=TOKEN))
    assert torch.equal(logits_of(local), logits_of(tiny_llama))


def test_dropped_commit_is_retried_by_bridge(hub, tiny_llama, monkeypatch):
    monkeypatch.setattr("bridge.apps.push.RETRY_WAITS_S", (0.0, 0.0))
    hub.drop_connection("commit", nth=1)
    push_to_hub(tiny_llama, REPO, token=TOKEN)
    assert hub.count("POST", r"/commit/main$") == 2
    assert len(HfApi(token=TOKEN).list_repo_commits(REPO)) == 2  # one commit, not two


def test_push_that_keeps_failing_leaves_no_half_commit(hub, tiny_llama, monkeypatch):
    monkeypatch.setattr("bridge.apps.push.RETRY_WAITS_S", (0.0, 0.0))
    HfApi(token=TOKEN).create_repo(REPO)
    before = _head()
    hub.drop_connection("commit", nth=1, times=100)
    with pytest.raises(BridgeError, match="failed 3 times.*run the same command again"):
        push_to_hub(tiny_llama, REPO, token=TOKEN)
    assert _head() == before and HfApi(token=TOKEN).list_repo_files(REPO) == [".gitattributes"]
    hub.clear_faults()
    push_to_hub(tiny_llama, REPO, token=TOKEN)  # the re-run finishes the push; LFS objects are not re-sent
    assert hub.count("PUT", r"^/lfs-upload/") == 1


def test_push_from_megatron_checkpoint(hub, tiny_llama, tmp_path):
    from bridge.api import import_hf
    from bridge.layout import ParallelLayout

    ckpt = import_hf(str(tiny_llama), tmp_path / "runs" / "r1", ParallelLayout(tp=2))
    (ckpt / "train_summary.json").write_text(json.dumps({
        "iterations": 20, "tokens": 40960, "final_train_loss": 4.5, "final_valid_loss": 4.75,
        "loss_curve": [[i, 5.0 - i / 40] for i in range(1, 21)]}))
    url = push_to_hub(ckpt, REPO, token=TOKEN, private=True)
    assert url.endswith(_head())
    assert [p.name for p in ckpt.parent.iterdir()] == ["r1"]  # the temporary export is gone
    local = Path(snapshot_download(REPO, token=TOKEN))
    assert torch.equal(logits_of(local), logits_of(tiny_llama))
    card = (local / "README.md").read_text()
    assert "Source: a local folder (`tiny-llama`)" in card and "base_model" not in card
    assert "TP=2, PP=1" in card and "| Iterations | 20 |" in card and "| Tokens | 40,960 |" in card
    assert "| Final validation loss | 4.75 |" in card and "![training loss](loss_curve.png)" in card
    assert (local / "loss_curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_push_prints_commit_url_and_one_line_errors(hub, tiny_llama, capsys):
    from bridge.cli.main import main

    assert main(["push", str(tiny_llama), REPO, "--token", TOKEN, "--commit-message", "via cli"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("/commit/" + _head()) and TOKEN not in out + err
    assert main(["push", str(tiny_llama), "not-a-repo-id", "--token", TOKEN]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bridge push: error:") and "<user or org>/<name>" in err and "\n" not in err


def test_cli_private_flag_creates_a_private_repo(hub, tiny_llama):
    """`bridge push --private` reaches the Hub: the repo is stored private and other users cannot see it, while
    the same push without the flag gives a repo they can."""
    from huggingface_hub.errors import RepositoryNotFoundError

    from bridge.cli.main import main

    public = f"{USER}/tiny-llama-public"
    assert main(["push", str(tiny_llama), REPO, "--token", TOKEN, "--private"]) == 0
    assert main(["push", str(tiny_llama), public, "--token", TOKEN]) == 0
    assert hub.state.repos[REPO].private and not hub.state.repos[public].private
    other = HfApi(token=OTHER_TOKEN)
    assert other.repo_info(public).id == public
    with pytest.raises(RepositoryNotFoundError):
        other.repo_info(REPO)
    assert HfApi(token=TOKEN).repo_info(REPO).private is True


def test_demo_push_uses_a_local_hub(tiny_llama):
    from bridge.apps.push import demo_push

    line = demo_push(tiny_llama)
    assert "pushed to a local test Hub" in line and "/commit/" in line and "bridge push" in line


def _fake_checkpoint(tmp_path: Path, **files: object) -> Path:
    """A folder with the metadata files a bridge checkpoint may hold (no weights: the card reads only these)."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "hf_meta").mkdir(parents=True)
    for name, content in files.items():
        path = ckpt / name.replace("__", "/")
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return ckpt


def test_model_card_carries_source_license_layout_and_verify_table(tiny_llama, tmp_path):
    from bridge.apps.model_card import build_model_card

    sha = "a" * 40
    ckpt = _fake_checkpoint(
        tmp_path,
        **{"bridge.json": {"format": "torch", "architecture": "LlamaForCausalLM", "layout": {"tp": 2, "pp": 2, "vpp": None},
                           "source": {"id": "meta-llama/Llama-3.2-1B", "revision": None,
                                      "path": f"/cache/models--meta-llama--Llama-3.2-1B/snapshots/{sha}"}},
           "hf_meta__README.md": "---\nlicense: llama3.2\nlanguage: en\n---\n# upstream card\n",
           "verify.json": {"pass": True, "max_abs_diff": 1.5e-06,
                           "rows": [{"layout": "tp2-pp2", "max_abs_diff": 1.5e-06, "pass": True}]}},
    )
    card = build_model_card(tiny_llama, f"{USER}/x", checkpoint=ckpt)
    meta = card.text.split("---")[1]
    assert "base_model: meta-llama/Llama-3.2-1B" in meta and "license: llama3.2" in meta
    assert "library_name: transformers" in meta and "- megatron-lm" in meta and "language" not in meta
    assert f"meta-llama/Llama-3.2-1B) at commit `{sha}`" in card.text and "TP=2, PP=2" in card.text
    assert "VPP" not in card.text  # vpp None: left out
    assert "| layout | max_abs_diff | pass |" in card.text and "| tp2-pp2 | 1.5e-06 | yes |" in card.text
    assert "## Training" not in card.text and card.assets == {}


@pytest.mark.parametrize("verify", ["not json at all", "[1, 2]", '{"rows": "x"}', "[{\"a\": 1}]", "null"])
def test_model_card_survives_odd_verify_files(tiny_llama, tmp_path, verify):
    from bridge.apps.model_card import build_model_card

    ckpt = _fake_checkpoint(tmp_path, **{"verify.json": verify})
    card = build_model_card(tiny_llama, f"{USER}/x", checkpoint=ckpt)
    assert card.text.startswith("---\n") and "## Use" in card.text
    assert ("| a |" in card.text) == (verify == '[{"a": 1}]')


def test_model_card_training_section_has_only_known_fields(tiny_llama, tmp_path):
    from bridge.apps.model_card import build_model_card

    ckpt = _fake_checkpoint(tmp_path, **{"train_summary.json": {"iterations": 7, "final_train_loss": 3.25}})
    card = build_model_card(tiny_llama, f"{USER}/x", checkpoint=ckpt)
    assert "| Iterations | 7 |" in card.text and "| Final train loss | 3.25 |" in card.text
    assert "Tokens" not in card.text and "validation" not in card.text and card.assets == {}


def test_loss_curve_png_is_a_valid_deterministic_image():
    import struct
    import zlib

    from bridge.apps.model_card import loss_curve_png

    points = [(float(i), 6.0 / (1 + i / 10)) for i in range(0, 200, 5)]
    png = loss_curve_png(points, width=320, height=200)
    assert png == loss_curve_png(points, width=320, height=200)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + data)
        chunks[kind], pos = data, pos + 12 + length
    assert struct.unpack(">II", chunks[b"IHDR"][:8]) == (320, 200)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == 200 * 321
    dark = sum(1 for b in raw if b == 0)  # filter bytes are 0 too: 200 of them
    assert dark > 200 + 300  # axes and curve drawn


def test_push_removes_the_staging_left_by_a_killed_push(hub, tiny_llama, tmp_path):
    """kill -9 during a push leaves its export beside the checkpoint; the next push removes it, and only it."""
    import socket
    import subprocess
    import sys

    from bridge.api import import_hf
    from bridge.layout import ParallelLayout

    ckpt = import_hf(str(tiny_llama), tmp_path / "runs" / "r1", ParallelLayout(tp=2))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        left = {name: ckpt.parent / name for name in (
            f".r1.push-{host}-{dead.stdout.strip()}-0badc0de",   # a killed push of this checkpoint
            f".r0.push-{host}-{dead.stdout.strip()}-00c0ffee",   # ... and of another one beside it
            f".r1.push-{host}-{alive.pid}-1234abcd",             # a push still running
            f".r1.push-other-host-{dead.stdout.strip()}-feedf00d",  # another machine's, on a shared disk
        )}
        for path in left.values():
            (path / "hf").mkdir(parents=True)
            (path / "hf" / "model.safetensors").write_bytes(b"\0" * 64)
        push_to_hub(ckpt, REPO, token=TOKEN)
    finally:
        alive.kill()
        alive.wait()
    remaining = sorted(p.name for p in ckpt.parent.iterdir())
    assert remaining == sorted(["r1", f".r1.push-{host}-{alive.pid}-1234abcd",
                                f".r1.push-other-host-{dead.stdout.strip()}-feedf00d"])
