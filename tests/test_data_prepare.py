"""`bridge data prepare`/`inspect`: round trips against the tokenizer, SFT masks, bad input, atomicity."""
from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bridge.data.prepare as prepare_module
from bridge.data import IndexedDataset, PrepareConfig, SFTDataset, load_tokenizer
from bridge.data.prepare import prepare
from bridge.errors import BridgeError, mount_point

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Megatron stores tokens in .bin files and offsets in .idx files.\nSecond line, with ünïcödé and 数字 123.",
    "def f(x):\n    return x * 2  # code is text too",
    " leading space and trailing space ",
    "a",
]


def build_tokenizer(folder: Path) -> Path:
    """A tiny byte-level BPE with BOS/EOS, ChatML specials and a chat template, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|begin|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 20 + ["user assistant system hello world answer question"] * 20, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|begin|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return load_tokenizer(str(tok_dir))


def write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as stream:
        for record in records:
            stream.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def run(tmp_path, tok_dir, inputs, **kwargs) -> tuple:
    kwargs.setdefault("progress", False)
    config = PrepareConfig(inputs=tuple(map(str, inputs)), output_prefix=str(tmp_path / "out" / "corpus"),
                           tokenizer=str(tok_dir), **kwargs)
    result = prepare(config)
    return result, {key: IndexedDataset(prefix) for key, prefix in result.prefixes.items()}


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_equals_direct_tokenization(tmp_path, tok_dir, tokenizer, workers):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS * 30)])
    result, datasets = run(tmp_path, tok_dir, [data], append_eod=True, workers=workers, chunk_size=7)
    dataset = datasets["text"]
    assert result.prefixes["text"] == str(tmp_path / "out" / "corpus_text_document")
    assert (tmp_path / "out" / "corpus_text_document.bin").is_file()
    assert dataset.dtype == np.uint16 and dataset.num_documents == len(TEXTS) * 30
    eos = tokenizer.eos_token_id
    for text, doc in zip(TEXTS * 30, dataset.documents()):
        assert doc.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    assert dataset.num_tokens == result.tokens["text"]
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_workers_give_identical_files(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in TEXTS * 40])
    outputs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        prepare(PrepareConfig(inputs=(str(data),), output_prefix=str(out / "c"), tokenizer=str(tok_dir),
                              workers=workers, chunk_size=5, progress=False))
        outputs.append([(out / f"c_text_document.{ext}").read_bytes() for ext in ("bin", "idx")])
    assert outputs[0] == outputs[1]


def test_special_tokens_and_several_keys(tmp_path, tok_dir, tokenizer):
    records = [{"title": t[:10], "body": t} for t in TEXTS]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    _, datasets = run(tmp_path, tok_dir, [data], json_keys=("title", "body"), add_special_tokens=True)
    for record, title, body in zip(records, datasets["title"].documents(), datasets["body"].documents()):
        assert title.tolist() == tokenizer(record["title"])["input_ids"]
        assert body.tolist()[0] == tokenizer.bos_token_id
        assert body.tolist() == tokenizer(record["body"])["input_ids"]


def _write_gz(path: Path, records) -> None:
    write_jsonl(path, records, gzip.open)


def _write_zst(path: Path, records) -> None:
    zstandard = pytest.importorskip("zstandard", reason="zstandard not installed (pip install bridge[data])")
    with zstandard.open(path, "wt", encoding="utf-8") as stream:
        stream.writelines(json.dumps(r) + "\n" for r in records)


def _write_parquet(path: Path, records) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install bridge[data])")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [r["content"] for r in records], "other": list(range(len(records)))}), path)


@pytest.mark.parametrize("name,writer", [("b.jsonl.gz", _write_gz), ("c.jsonl.zst", _write_zst),
                                         ("d.parquet", _write_parquet)])
def test_compressed_and_parquet_inputs_match_plain_jsonl(tmp_path, tok_dir, name, writer):
    records = [{"content": t} for t in TEXTS]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    writer(tmp_path / name, records)
    _, expected = run(tmp_path / "plain", tok_dir, [plain], json_keys=("content",))
    _, got = run(tmp_path / "other", tok_dir, [tmp_path / name], json_keys=("content",))
    assert [d.tolist() for d in got["content"].documents()] == [d.tolist() for d in expected["content"].documents()]
    _, both = run(tmp_path / "both", tok_dir, [plain, tmp_path / name, plain], json_keys=("content",))
    assert both["content"].num_documents == 3 * len(TEXTS)


def test_parquet_missing_column_is_a_clear_error(tmp_path, tok_dir):
    _write_parquet(tmp_path / "d.parquet", [{"content": "x"}])
    with pytest.raises(BridgeError, match=r"d\.parquet: no column text \(columns: content, other\)"):
        run(tmp_path, tok_dir, [tmp_path / "d.parquet"])


def test_malformed_json_stops_with_file_and_line(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "fine"}, '{"text": "broken', {"text": "x"}])
    with pytest.raises(BridgeError, match=r"bad\.jsonl:3: malformed JSON.*--skip-bad-records"):
        run(tmp_path, tok_dir, [data])
    assert os.listdir(tmp_path / "out") == []  # nothing half-written


def test_bad_records_skipped_by_flag(tmp_path, tok_dir, caplog):
    records = [{"text": "ok"}, '{"text": ', {"body": "no text key"}, "", {"text": 5}, {"text": "last"}]
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    with caplog.at_level(logging.WARNING):
        result, datasets = run(tmp_path, tok_dir, [data], skip_bad_records=True)
    assert result.skipped_bad == 3 and datasets["text"].num_documents == 2  # line 4 is blank: not a record
    assert "bad.jsonl:2: malformed JSON" in caplog.text
    assert "bad.jsonl:3: no key 'text' (keys: body)" in caplog.text
    assert "bad.jsonl:5: 'text' is int" in caplog.text


def test_missing_key_is_a_clear_error(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"content": "hello"}])
    with pytest.raises(BridgeError, match=r"d\.jsonl:1: no key 'text' \(keys: content\); pass --json-keys"):
        run(tmp_path, tok_dir, [data])


def test_empty_documents_are_skipped_and_all_empty_is_an_error(tmp_path, tok_dir, caplog):
    data = write_jsonl(tmp_path / "e.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two"}])
    with caplog.at_level(logging.WARNING):
        result, datasets = run(tmp_path, tok_dir, [data], append_eod=True)
    assert result.skipped_empty == 1 and datasets["text"].num_documents == 2
    assert "e.jsonl:2: empty document" in caplog.text
    only_empty = write_jsonl(tmp_path / "z.jsonl", [{"text": ""}])
    with pytest.raises(BridgeError, match="no document with tokens"):
        run(tmp_path / "z", tok_dir, [only_empty])
    assert not (tmp_path / "z" / "out").exists() or os.listdir(tmp_path / "z" / "out") == []


def test_bad_inputs_and_tokenizers(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(BridgeError, match="does not exist"):
        run(tmp_path, tok_dir, [tmp_path / "missing.jsonl"])
    with pytest.raises(BridgeError, match="unknown input format"):
        run(tmp_path, tok_dir, [tmp_path / "d.csv"]) if (tmp_path / "d.csv").write_text("x") else None
    with pytest.raises(BridgeError, match="no folder named"):
        run(tmp_path, tmp_path / "no-such-tokenizer", [data])
    with pytest.raises(BridgeError, match="could not load the tokenizer"):
        run(tmp_path, tmp_path, [data])  # a folder without tokenizer files
    with pytest.raises(BridgeError, match="--workers"):
        run(tmp_path, tok_dir, [data], workers=0)


def test_tokenizer_from_bridge_checkpoint_and_hub(tmp_path, tok_dir, hub):
    from huggingface_hub import HfApi

    from tests.hub_fixture import TOKEN, USER

    checkpoint = tmp_path / "ckpt"
    (checkpoint / "hf_meta").mkdir(parents=True)
    (checkpoint / "bridge.json").write_text("{}")
    for file in tok_dir.iterdir():
        (checkpoint / "hf_meta" / file.name).write_bytes(file.read_bytes())
    direct = load_tokenizer(str(tok_dir))
    assert load_tokenizer(str(checkpoint))("hello world")["input_ids"] == direct("hello world")["input_ids"]
    api = HfApi(token=TOKEN)
    api.create_repo(f"{USER}/tiny-tok")
    api.upload_folder(repo_id=f"{USER}/tiny-tok", folder_path=str(tok_dir))
    from_hub = load_tokenizer(f"{USER}/tiny-tok", token=TOKEN)
    assert from_hub("hello world")["input_ids"] == direct("hello world")["input_ids"]
    with pytest.raises(BridgeError, match=f"could not download the tokenizer of {USER}/does-not-exist"):
        load_tokenizer(f"{USER}/does-not-exist", token=TOKEN)


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_leaves_nothing(tmp_path, tok_dir, monkeypatch, workers):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS * 20])
    out = tmp_path / "out"
    out.mkdir()
    (out / "corpus_text_document.idx").write_bytes(b"previous run")
    real_iter_chunks = prepare_module.iter_chunks

    def interrupted(*args, **kwargs):
        for number, chunk in enumerate(real_iter_chunks(*args, **kwargs)):
            if number == 3:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(prepare_module, "iter_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tok_dir, [data], workers=workers, chunk_size=4)
    assert os.listdir(out) == ["corpus_text_document.idx"]
    assert (out / "corpus_text_document.idx").read_bytes() == b"previous run"


CHATS = [
    {"messages": [{"role": "system", "content": "You answer briefly."},
                  {"role": "user", "content": "hello world"},
                  {"role": "assistant", "content": "hello! the answer is 42."},
                  {"role": "user", "content": "and again?"},
                  {"role": "assistant", "content": "again: 42"}]},
    {"messages": [{"role": "user", "content": "answer"}, {"role": "assistant", "content": "answer"}]},
]


def test_chat_loss_mask_keeps_only_assistant_tokens(tmp_path, tok_dir, tokenizer):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    result, datasets = run(tmp_path, tok_dir, [data], chat=True, json_keys=("messages",))
    sft = SFTDataset(result.prefixes["messages"])
    assert sft.loss_mask.prefix.endswith("corpus_messages_document_loss_mask") and len(sft) == 2
    for record, index in zip(CHATS, range(2)):
        tokens, mask = (np.asarray(a) for a in sft[index])
        assert tokens.tolist() == tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
        trained = tokenizer.decode(tokens[mask == 1].tolist())
        answers = [m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant"]
        assert trained == "".join(answers)
        assert mask[0] == 0  # the user's identical "answer" in record 1 is not trained on


def test_chat_with_append_eod_masks_the_eod(tmp_path, tok_dir, tokenizer):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    result, _ = run(tmp_path, tok_dir, [data], chat=True, json_keys=("messages",), append_eod=True)
    tokens, mask = SFTDataset(result.prefixes["messages"])[1]
    assert tokens[-1] == tokenizer.eos_token_id and mask[-1] == 0
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert mask[np.flatnonzero(np.asarray(tokens) == im_end)[-1]] == 1  # the assistant's end of turn is trained


def test_chat_without_assistant_is_a_bad_record(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "c.jsonl", [CHATS[1], {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(BridgeError, match=r"c\.jsonl:2: no assistant message"):
        run(tmp_path, tok_dir, [data], chat=True, json_keys=("messages",))


def test_cli_prepare_and_inspect(tmp_path, tok_dir, monkeypatch, capsys):
    import bridge.cli.main as cli_main

    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("bridge.cli.data",))  # only the command under test
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    prefix = str(tmp_path / "corpus")
    argv = ["data", "prepare", str(data), "--tokenizer", str(tok_dir), "--output-prefix", prefix,
            "--append-eod", "--workers", "2", "--no-progress"]
    assert cli_main.main(argv) == 0
    assert f"{prefix}_text_document: {len(TEXTS)} documents" in capsys.readouterr().out
    assert cli_main.main(["data", "inspect", f"{prefix}_text_document", "--tokenizer", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert f"documents  {len(TEXTS)}" in out and "The quick brown fox" in out
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    assert cli_main.main(["data", "prepare", "--input", str(chats), "--tokenizer", str(tok_dir),
                          "--output-prefix", str(tmp_path / "sft"), "--chat", "--no-progress"]) == 0
    assert cli_main.main(["data", "inspect", str(tmp_path / "sft_messages_document")]) == 0
    assert "loss mask" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    assert cli_main.main(["data", "prepare", str(bad), "--tokenizer", str(tok_dir), "--output-prefix", prefix,
                          "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bridge data: error: ") and "bad.jsonl:1: malformed JSON" in err and "\n" not in err


def test_workers_start_without_torch_or_transformers(tok_dir, tokenizer):
    """A worker unpickles the plain-text encoder (the Rust tokenizer only) and encodes the same ids
    without importing torch or transformers: the cheap start that makes a forkserver pool fast."""
    encoder = prepare_module.Encoder(tokenizer, keys=("text",), dtype=np.uint16, eod=None,
                                     add_special_tokens=False, chat=False)
    payload = json.dumps({"text": TEXTS[0]}).encode()
    script = (
        "import pickle, sys\n"
        "encoder = pickle.loads(sys.stdin.buffer.read())\n"
        "from bridge.data.sources import Chunk\n"
        f"out = encoder(Chunk(source='x', items=[(1, {payload!r})]))\n"
        "print(out.tokens['text'][0].tolist())\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(encoder), capture_output=True, check=True)
    ids, imported = proc.stdout.decode().splitlines()
    assert json.loads(ids) == tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert imported == "[]"
    assert prepare_module._pool_context().get_start_method() == "forkserver"


class _FullDisk:
    """A file whose writes fail as on a full disk (the rest goes to the real file)."""

    def __init__(self, real) -> None:
        self.real = real

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path, tok_dir, monkeypatch, capsys, workers):
    import bridge.cli.main as cli_main

    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("bridge.cli.data",))
    real_open = prepare_module._open_writers

    def full_disk_writers(*args, **kwargs):
        writers = real_open(*args, **kwargs)
        for writer in writers.values():
            writer._bin = _FullDisk(writer._bin)
        return writers

    monkeypatch.setattr(prepare_module, "_open_writers", full_disk_writers)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "out"
    code = cli_main.main(["data", "prepare", str(data), "--tokenizer", str(tok_dir), "--output-prefix",
                          str(out / "corpus"), "--workers", str(workers), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err, err
    assert err.startswith(f"bridge data: error: no space left on {mount_point(out)} writing {out}/corpus_text_document.bin; ")
    assert os.listdir(out) == []  # no .tmp left filling the disk


def test_jsonl_that_is_not_utf8_names_the_line_and_byte(tmp_path, tok_dir, monkeypatch, capsys):
    import bridge.cli.main as cli_main

    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("bridge.cli.data",))
    lines = [json.dumps({"text": f"line {i} " + "x" * 5000}).encode() + b"\n" for i in range(10)]
    lines[7] = b'{"text": "caf\xe9 in latin-1"}\n'
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b"".join(lines))
    for path in (data, tmp_path / "latin1.jsonl.gz"):
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(data.read_bytes()))
        code = cli_main.main(["data", "prepare", str(path), "--tokenizer", str(tok_dir), "--output-prefix",
                              str(tmp_path / "out" / "c"), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and "\n" not in err, err
        offset = sum(map(len, lines[:7])) + len(b'{"text": "caf')
        assert f"{path}:8: not UTF-8 (byte {offset}" in err
