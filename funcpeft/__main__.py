"""The ``funcpeft`` command line: ``funcpeft inspect PATH`` (also ``python -m funcpeft inspect PATH``).

``inspect`` reports what a PEFT-format adapter folder (written by PEFT's ``save_pretrained`` or by
:func:`funcpeft.save`) holds: method, targets, per-module ranks and scalings read from the tensors (AdaLoRA's
from its ``rank_pattern`` masks where it has them), options, parameter counts, dtypes and file sizes; ``--json``
prints the same facts for scripts. ``PATH`` may also be a Hugging Face Hub id (``org/name``, with ``--revision``
and ``--subfolder``), resolved through huggingface_hub's cache as :func:`funcpeft.load` resolves it. It reads the
folder only through :mod:`funcpeft.io`'s readers, so it sees exactly what :func:`funcpeft.load` would load, and
it reports a folder that ``load`` would refuse as one ``funcpeft inspect: error: ...`` line with exit status 2. No
input makes it print a traceback: anything unexpected is that one line too, and library warnings (torch's unpickler's)
are silenced so that stderr holds only it.

Each subcommand is a ``_add_<name>(subparsers)`` function that registers its parser and sets ``run``. The
checkpoint is read into facts by :mod:`funcpeft._describe` and turned into text by :mod:`funcpeft._render`; their
names are re-exported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from funcpeft._describe import InspectError, describe
from funcpeft._render import render

__all__ = ["main", "describe"]

PROG = "funcpeft"
EXIT_ERROR = 2  # argparse's status for bad arguments; an unreadable adapter is bad input too


# ----- subcommands ---------------------------------------------------------------------------------------------


def _add_inspect(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarise a PEFT-format adapter folder",
        description=(
            "Summarise a PEFT-format adapter folder (adapter_config.json + adapter_model.safetensors, written by "
            "PEFT's save_pretrained or funcpeft.save) or Hugging Face Hub id: method, adapted modules, per-module "
            "rank (read from the tensors; AdaLoRA's from its rank_pattern masks), lora_alpha and scaling, options, "
            "trainable parameters (adapter tensors and full copies such as modules_to_save), dtypes and file "
            "sizes. A Hub id is resolved through huggingface_hub's cache (HF_HUB_OFFLINE=1: the cache only; needs "
            "`pip install 'funcpeft[hub]'`); an existing folder always wins. An adapter funcpeft cannot load is "
            "reported on one line, with exit status 2."
        ),
    )
    parser.add_argument("path", help="the adapter folder, or a Hugging Face Hub id (org/name)")
    parser.add_argument("--revision", help="Hub ids: the branch, tag or commit (default: the repo's default branch)")
    parser.add_argument("--subfolder", help="the folder inside the Hub repo (or the local folder) with the adapter")
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    parser.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's unpickler on a protocol-4 .bin: only our line on stderr
            # this module's from_peft_state_dict, looked up now: replacing it here replaces what describe calls
            facts = describe(args.path, revision=args.revision, subfolder=args.subfolder)
            text = json.dumps(facts, indent=2) if args.json else render(facts)
    except InspectError as err:
        print(f"{PROG} inspect: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - a CLI reports, on one line, even what funcpeft did not foresee
        message = " ".join(f"{type(err).__name__}: {err}".split())
        print(
            f"{PROG} inspect: error: {str(args.path)!r}: unexpected {message} (a funcpeft bug; please report it)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `funcpeft inspect ... | head`: the reader left; exit quietly (Python's docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _add_demo(subparsers: Any) -> None:
    from funcpeft import demo

    parser = subparsers.add_parser(
        "demo",
        help="train several LoRA adapters at once on a built-in model, save, reload and serve them",
        description=demo.__doc__.split("\n\n", 1)[1].replace("``", "") if demo.__doc__ else None,
    )
    demo.add_arguments(parser)
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from funcpeft import demo

    demo.run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Tools for funcpeft and PEFT-format adapters.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_demo(subparsers)
    _add_inspect(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
