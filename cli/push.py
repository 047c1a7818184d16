"""`bridge push`: upload an HF folder or a bridge checkpoint to the Hugging Face Hub, with a model card."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  bridge push r1-hf me/my-llama                   # an HF folder
  bridge push runs/r1 me/my-llama --private       # a Megatron checkpoint, exported on the fly
  bridge push runs/r1 me/my-llama --revision exp-3 --commit-message "2k steps on corpus v2"
  bridge push runs/lora1 me/my-llama-lora --adapter   # a LoRA run's adapter (PEFT folder); without: merged

The token comes from --token, else HF_TOKEN, else `hf auth login`; HF_ENDPOINT selects another Hub."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload an HF folder or a Megatron checkpoint to the Hub, with a model card",
        description="Upload a model to the Hugging Face Hub in one commit, with a model card (README.md) that "
        "says where the weights came from, how they were trained and verified.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="an HF folder (config.json + safetensors) or a bridge checkpoint folder")
    parser.add_argument("repo_id", help="the Hub repo, <user or org>/<name>; created if missing")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or the login cache)")
    parser.add_argument("--commit-message", default=None, help="commit title (default: names the source)")
    parser.add_argument("--adapter", action="store_true", help="a LoRA run's adapter as a PEFT folder, with a card "
                                                                "naming its base model (default: merged into the base)")
    parser.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    from bridge.apps.push import push_to_hub

    url = push_to_hub(args.source, args.repo_id, revision=args.revision, private=args.private,
                      token=args.token, commit_message=args.commit_message, adapter=args.adapter)
    print(url)
    return 0
