"""The ``ehrlake`` command line; ``spark-submit jobs/<job>.py`` takes the same arguments.

Every command: ``--help``; exit 0 on success; on failure one clear line on stderr and exit 1
(2 for bad arguments, as argparse does). Each command lives in a module of this package beside its
arguments (``stages``, ``access``, ``keys``, ``modelling``, ``federated``, ``views``, ``export``,
``review``, ``planning``, ``pipeline``) and calls the library; this module builds the parser from
them and runs the chosen command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ehrlake.cli import (
    access,
    common,
    export,
    federated,
    keys,
    modelling,
    pipeline,
    planning,
    review,
    stages,
    views,
)
from ehrlake.errors import EhrlakeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ehrlake", description="EHR lakehouse on Apache Spark and Delta Lake."
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Spark's own log and full stack traces on errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (stages, access, keys, modelling, federated, views, export, review, planning):
        module.register(sub)
    pipeline.register(sub, build_parser, dispatch)
    return parser


def console() -> int:
    """The installed ``ehrlake`` program: :func:`main` with third-party noise kept out of its
    output (:mod:`ehrlake.noise`; ``--verbose`` keeps it)."""
    from ehrlake import noise

    if "--verbose" not in sys.argv[1:]:
        noise.filter_stderr()
    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["EHRLAKE_DEBUG"] = "1"
    # Spark's log off unless asked for: a failure is this command's one line, not a page of JVM frames
    os.environ.setdefault("EHRLAKE_SPARK_LOG", "WARN" if args.verbose else "OFF")
    if not args.verbose:
        # PySpark logs every analysis error it converts (the plan, the JVM stack, as one JSON line to
        # stderr) from its own Python loggers, which no Spark log level reaches
        for name in ("DataFrameQueryContextLogger", "SQLQueryContextLogger"):
            logging.getLogger(name).disabled = True
    return dispatch(args)


def dispatch(args) -> int:
    """Run one parsed command; its failure is one line on stderr and exit status 1."""
    from ehrlake import session

    try:
        session.require_runtime(args.command)
        return args.handler(args)
    except EhrlakeError as exc:
        print(f"ehrlake: error: {exc}", file=sys.stderr)
        return common.EXIT_FAILURE
    except KeyboardInterrupt:
        print("ehrlake: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: still one clear line, with the type for a bug report
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if type(exc).__name__ == "PySparkImportError" and "PyArrow" in first:  # e.g. train --algorithms rf
            print(f"ehrlake: error: {session.wrong_runtime(args.command)}", file=sys.stderr)
            return common.EXIT_FAILURE
        print(f"ehrlake: error: {type(exc).__name__}: {first[:500]}", file=sys.stderr)
        if os.environ.get("EHRLAKE_DEBUG"):
            raise
        return common.EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(console())
