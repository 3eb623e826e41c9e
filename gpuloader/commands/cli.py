"""The ``gpuloader`` command: one sub-command per module that owns it.

Each sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys

#: sub-command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("gpuloader.commands.generate", "write a dataset in the upstream format"),
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


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`]*)`")


def plain_text(doc: str | None) -> str:
    """A docstring as help text: Sphinx roles and double backquotes removed.

    A role ``:class:`~a.b.Name` `` becomes ``Name`` (the last dotted part when the target
    starts with ``~``), ``:func:`a.b` `` becomes ``a.b``; double backquotes are dropped.
    """
    if not doc:
        return ""

    def role(m: re.Match[str]) -> str:
        target = m.group(2).strip()
        return target.rsplit(".", 1)[-1] if m.group(1) else target

    return _ROLE.sub(role, inspect.cleandoc(doc)).replace("``", "")


class _ParagraphFormatter(argparse.HelpFormatter):
    """Fills each blank-line-separated paragraph of a description on its own."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        paragraphs = re.split(r"\n\s*\n", text.strip())
        return "\n\n".join(fill(p, width, indent) for p in paragraphs)


def build_parser() -> argparse.ArgumentParser:
    """The ``gpuloader`` parser; each sub-command's parser is in ``parser.subcommands``."""
    from gpuloader import __version__

    parser = argparse.ArgumentParser(
        prog="gpuloader",
        description="Generate, check, pack and load hierarchical voxel ray-tracing datasets.",
        formatter_class=_ParagraphFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gpuloader {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands: dict[str, argparse.ArgumentParser] = {}
    for name, (module_name, help_) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_,
            description=plain_text(module.__doc__),
            formatter_class=_ParagraphFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        subcommands[name] = p
    parser.subcommands = subcommands  # type: ignore[attr-defined]
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` where an unknown option of a sub-command is the sub-command's error.

    argparse hands options a sub-parser does not know back to the top-level parser, which
    prints its own usage; here the sub-command's parser reports them (its usage, exit 2).
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        owner = parser.subcommands.get(args.command, parser)  # type: ignore[attr-defined]
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _check_folders(args: argparse.Namespace) -> None:
    """``verify``'s DATASET_DIR and RAY_DIR the right way round (``info`` checks its own)."""
    if args.command == "verify":
        from gpuloader.commands.info.folders import check_roots

        check_roots(args.dataset_dir, args.ray_dir, "verify")


def _quiet_workers_exit() -> None:
    """After Ctrl-C: no ``Exception ignored in atexit callback`` from the interpreter's exit.

    multiprocessing's exit handler joins child processes; a second Ctrl-C (or the first
    reaching it) would print a traceback there. Worker processes are already terminated by
    the code that started them; ignore SIGINT for the rest of the exit.
    """
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main thread
        pass


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (``gpuloader info ... | head``): stop without a traceback.

    Points stdout at /dev/null so that the interpreter's final flush cannot fail again, and
    returns 141, the status a shell gives a process ended by SIGPIPE.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests)
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    from gpuloader.errors import GPULoaderError

    parser = build_parser()
    args = _parse(parser, argv)
    if args.command is None:  # `gpuloader` alone: a usage error, as a missing argument
        parser.print_help(sys.stderr)
        print(f"gpuloader: error: give a COMMAND ({', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        _check_folders(args)
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here rather than at exit
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except GPULoaderError as exc:
        print(f"gpuloader {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _quiet_workers_exit()
        again = "; run the same command again to resume" if args.command == "generate" else ""
        print(f"gpuloader {args.command}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
