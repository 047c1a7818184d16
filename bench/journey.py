"""The whole user journey at real size, every step through the `bridge` command as a user types it.

    HF shards on a Hub server -> bridge import <repo id> -> bridge train (saves; killed; resumed)
    -> bridge export -> bridge verify --dtype bf16 -> bridge push -> snapshot_download + transformers

One GPU (Llama-3.2-1B's real config at full size, random weights saved as ~1 GB shards):
    python bench/journey.py --out /tmp/journey
CPU smoke (the same journey on a scaled-down model, a few steps):
    python bench/journey.py --smoke

The Hub is the Hub-compatible server of the test suite (tests/hub_server.py) on 127.0.0.1: the real
huggingface_hub client pushes and downloads through it. Each step is one process; its wall time, peak
resident memory (its own, from wait4) and, on a GPU, the device's peak used memory (nvidia-smi, sampled
every 0.2 s, CUDA context included) go into a table and `<out>/journey.json`. Any failing step stops the
journey with its output.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.hub_server: the Hub-compatible server

REAL_CONFIG = ROOT / "bench" / "configs" / "meta-llama--Llama-3.2-1B.json"
USER, TOKEN = "me", "hf_journey_token"


@dataclass
class StepResult:
    step: str
    seconds: float
    peak_rss_gib: float
    peak_gpu_gib: float | None
    note: str = ""


class GpuPeak:
    """The device's largest `memory.used` while a step runs (nvidia-smi; None without a GPU)."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if shutil.which("nvidia-smi") else None

    def _poll(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.peak_mib = max(self.peak_mib or 0.0, max(float(v) for v in out))
            self._stop.wait(0.2)

    def __enter__(self) -> "GpuPeak":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


class Journey:
    def __init__(self, out: Path, env: dict[str, str]) -> None:
        self.out, self.env, self.results = out, env, []
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        shown = cmd[:2] + [f"<{name} script>"] + cmd[3:] if cmd[1] == "-c" else cmd
        print(f"$ {' '.join(shown)}", flush=True)
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self, name: str, proc: subprocess.Popen, began: float, gpu: GpuPeak, *, expect_ok: bool = True,
               note: str = "") -> StepResult:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if expect_ok and proc.returncode != 0:
            sys.exit(f"step {name} failed (exit {proc.returncode}):\n{(self.logs / f'{name}.log').read_text()[-4000:]}")
        gib = usage.ru_maxrss / 2**20  # KiB on Linux
        result = StepResult(name, round(time.perf_counter() - began, 1), round(gib, 2),
                            None if gpu.peak_mib is None else round(gpu.peak_mib / 1024, 1), note)
        self.results.append(result)
        print(f"  {name}: {result.seconds} s, peak RSS {result.peak_rss_gib} GiB"
              + ("" if result.peak_gpu_gib is None else f", GPU {result.peak_gpu_gib} GiB"), flush=True)
        return result

    def run(self, name: str, cmd: list[str], note: str = "") -> StepResult:
        began = time.perf_counter()
        with GpuPeak() as gpu:
            proc = self.start(name, cmd)
            return self.finish(name, proc, began, gpu, note=note)

    def python(self, name: str, code: str, *args: str) -> StepResult:
        return self.run(name, [sys.executable, "-c", code, *args])


def bridge(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge.cli", *args]


MAKE_MODEL = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
data = json.loads(open(sys.argv[1]).read())
data.update(json.loads(sys.argv[3]))
config = AutoConfig.for_model(**data)
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(device):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2], max_shard_size=sys.argv[4])
"""

UPLOAD = """
import sys
from huggingface_hub import HfApi
api = HfApi(token=sys.argv[3])
api.create_repo(sys.argv[2], exist_ok=True)
api.upload_folder(folder_path=sys.argv[1], repo_id=sys.argv[2])
"""

LOAD_AND_COMPARE = """
import sys, torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM
pulled = snapshot_download(sys.argv[1], token=sys.argv[3])
device = "cuda" if torch.cuda.is_available() else "cpu"
logits = []
for folder in (pulled, sys.argv[2]):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, trust_remote_code=False).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        logits.append(model(ids).logits.float())
    del model
assert torch.equal(logits[0], logits[1]), "the downloaded model computes something else than the exported one"
print("downloaded model loads with transformers; logits equal the exported folder's")
"""


def hub_env(url: str, hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", HF_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    return env


def latest_iteration(save: Path) -> int:
    tracker = save / "latest_checkpointed_iteration.txt"
    text = tracker.read_text().strip() if tracker.is_file() else ""
    return int(text) if text.isdigit() else -1


def train_kill_resume(j: Journey, cmd: list[str], save: Path, kill_after: int) -> None:
    """Train until the checkpoint of `kill_after` is complete, SIGKILL the run, then resume it the way
    Megatron-LM users do (`--load SAVE --save SAVE`) and check that it went on from that checkpoint."""
    began = time.perf_counter()
    with GpuPeak() as gpu:
        proc = j.start("train", cmd)
        while latest_iteration(save) < kill_after:
            if proc.poll() is not None:
                sys.exit(f"training ended before its checkpoint {kill_after}:\n{(j.logs / 'train.log').read_text()[-4000:]}")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        j.finish("train", proc, began, gpu, expect_ok=False, note=f"killed (SIGKILL) after the save of iteration {kill_after}")
    resumed_from = latest_iteration(save)
    resume = list(cmd)
    resume[resume.index("--load") + 1] = str(save)
    # a run that outpaced the kill (a tiny model trains its last steps between two polls) still resumes for a save
    iters = resume.index("--train-iters") + 1
    resume[iters] = str(max(int(resume[iters]), resumed_from + kill_after))
    j.run("train-resume", resume, note=f"resumed from iteration {resumed_from}")
    saved = [int(m) for m in re.findall(r"saved checkpoint .*iter_(\d+)", (j.logs / "train-resume.log").read_text())]
    if not saved or min(saved) <= resumed_from:
        sys.exit(f"the resumed run saved iterations {saved}: it did not go on from iteration {resumed_from}")


def journey(args: argparse.Namespace) -> list[StepResult]:
    from tests.hub_server import HubServer

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cuda = not args.smoke
    shape = json.dumps(SMOKE_SHAPE if args.smoke else {})
    with HubServer(tokens={TOKEN: USER}) as hub:
        j = Journey(out, hub_env(hub.url, out / "hf_home"))
        source, repo, pushed = out / "source", f"{USER}/llama-3.2-1b-random", f"{USER}/llama-3.2-1b-trained"
        j.python("make-model", MAKE_MODEL, str(REAL_CONFIG), str(source), shape, args.shard_size)
        shards = sorted(p.name for p in source.glob("*.safetensors"))
        j.results[-1].note = f"{len(shards)} safetensors shards"
        j.python("hub-upload", UPLOAD, str(source), repo, TOKEN)
        j.run("import", bridge("import", repo, "--tp", "1", "--out", str(out / "ckpt")), note="by repo id, through the HF cache")
        save = out / "run"
        gpu_flags = ["--bf16", "--compile", "--device", "cuda"] if cuda else ["--device", "cpu"]
        train = bridge("train", "--load", str(out / "ckpt"), "--mock-data", *gpu_flags,
                       "--micro-batch-size", str(args.micro_batch_size), "--seq-length", str(args.seq_length),
                       "--train-iters", str(args.iters), "--save", str(save), "--save-interval", str(args.save_interval),
                       "--keep-last-checkpoints", "2", "--log-interval", "10", "--no-progress",
                       "--eval-iters", "2")
        train_kill_resume(j, train, save, args.save_interval)
        j.run("export", bridge("export", str(save), "--out", str(out / "exported")))
        j.run("verify", bridge("verify", str(out / "exported"), str(save), "--dtype", "bf16" if cuda else "fp32",
                               "--device", "cuda" if cuda else "cpu"))
        j.run("push", bridge("push", str(out / "exported"), pushed, "--token", TOKEN))
        j.python("download-and-load", LOAD_AND_COMPARE, pushed, str(out / "exported"), TOKEN)
    (out / "journey.json").write_text(json.dumps([asdict(r) for r in j.results], indent=2) + "\n")
    return j.results


SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512, bos_token_id=1, eos_token_id=2)


def table(results: list[StepResult]) -> str:
    rows = ["| step | seconds | peak RSS GiB | peak GPU GiB | note |", "|---|---|---|---|---|"]
    rows += [f"| {r.step} | {r.seconds} | {r.peak_rss_gib} | {'' if r.peak_gpu_gib is None else r.peak_gpu_gib} | {r.note} |"
             for r in results]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/bridge-journey", help="work folder (replaced)")
    p.add_argument("--smoke", action="store_true", help="CPU, scaled-down model, a few steps")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--save-interval", type=int, default=100)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--shard-size", default="1GB", help="max_shard_size of the source model's save_pretrained")
    args = p.parse_args()
    if args.smoke:
        args.iters, args.save_interval, args.micro_batch_size, args.seq_length, args.shard_size = 4, 2, 2, 32, "60KB"
    began = time.perf_counter()
    results = journey(args)
    print(table(results))
    print(f"journey: {time.perf_counter() - began:.0f} s end to end, every step clean")


if __name__ == "__main__":
    main()
