"""The ``gpuloader`` command: one sub-command per module that owns it.

Each sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("gpuloader.generate.command", "write a dataset in the upstream format"),
    "verify": (
        "gpuloader.commands.verify",
        "check a dataset's layout and re-trace a sample of rays",
    ),
    "info": (
        "gpuloader.commands.info",
        "summarize a dataset per split and level (optionally plot)",
    ),
    "pack": (
        "gpuloader.commands.pack",
        "pack ray files into memory-mapped arrays for fast reading",
    ),
    "demo": ("gpuloader.commands.demo", "generate the demo data and run the loader on it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuloader",
        description="Generate, check, pack and load hierarchical voxel ray-tracing datasets.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gpuloader.errors import GPULoaderError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except GPULoaderError as exc:
        print(f"gpuloader {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpuloader {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
