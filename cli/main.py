"""Entry point of the `bridge` command: builds the sub-command parsers and turns BridgeError into one line."""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from typing import Sequence

from bridge.errors import BridgeError

#: Sub-command modules, in the order `bridge --help` lists them. Each module defines
#: `register(subparsers)` which adds its parser(s) and sets `func=<callable(args) -> int>`.
COMMAND_MODULES: tuple[str, ...] = (
    "bridge.cli.convert",
    "bridge.cli.demo",
    "bridge.cli.push",
    "bridge.cli.data",
    "bridge.cli.verify",
    "bridge.cli.train",
)


class _VersionAction(argparse.Action):
    """`bridge --version`: the versions that decide behaviour, read only when asked (importing torch is slow)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:  # noqa: A002
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        import bridge

        def of(package: str) -> str:
            try:
                return version(package)
            except PackageNotFoundError:
                return "not installed"

        print(f"bridge {bridge.__version__} (torch {of('torch')}, transformers {of('transformers')}, "
              f"safetensors {of('safetensors')}, huggingface_hub {of('huggingface_hub')})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge",
        description="Move LLMs between Hugging Face and Megatron-style parallel training.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_VersionAction, help="print bridge's version and those of torch and "
                        "transformers, then exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "huggingface_hub"):  # not one line per HTTP request
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except BridgeError as exc:
        print(f"bridge {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bridge {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary outputs are removed on the way out."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
