"""``ehrlake pipeline FILE``: the steps of a pipeline file, parsed up front, run in one process."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io

from ehrlake.cli import common
from ehrlake.errors import ConfigError, EhrlakeError


def register(sub, build_parser, dispatch) -> None:
    """Add ``pipeline``; its steps are parsed with ``build_parser`` and run through ``dispatch``
    (passed in: this module is one of those the parser is built from)."""
    pipe = sub.add_parser(
        "pipeline",
        help="run declared steps (ehrlake command lines) in one process and one SparkSession",
        description="Run the steps of a pipeline file (e.g. conf/pipelines/demo.yaml) in order, in one "
        "SparkSession; --lake, --conf and --role apply to every step that takes them. The first failing "
        "step stops the run; re-running is safe.",
    )
    pipe.add_argument("file", help="pipeline YAML: steps, a list of ehrlake command lines")
    common.lake_options(pipe)
    common.role_option(pipe)
    pipe.set_defaults(handler=functools.partial(cmd_pipeline, build_parser=build_parser, dispatch=dispatch))


def cmd_pipeline(args, build_parser, dispatch) -> int:
    from ehrlake import pipeline, session

    shared = {"lake": args.lake, "conf": args.conf, "role": args.role}
    parsed = {}
    for i, step in enumerate(pipeline.load(args.file), 1):  # every step checked before the first runs
        parsed[step] = parsed_step = _parse_step(build_parser, args.file, i, step)
        for name, value in shared.items():  # the pipeline's options, where the step takes them
            if value is not None and hasattr(parsed_step, name) and getattr(parsed_step, name) is None:
                setattr(parsed_step, name, value)
        try:
            session.require_runtime(parsed_step.command)
        except EhrlakeError as exc:
            raise ConfigError(f"{args.file}: step {i} ({step}): {exc}") from None
    pipeline.run(list(parsed), lambda step: dispatch(parsed[step]))
    return 0


def _parse_step(build_parser, path: str, number: int, step) -> argparse.Namespace:
    """One pipeline step's command line, parsed as the CLI would; a mistake is one line naming the
    file and step (argparse's own message, without its usage text)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(list(step.argv))
    except SystemExit:
        said = [line for line in errors.getvalue().splitlines() if line.strip()]
        reason = said[-1].split("error: ", 1)[-1] if said else "not an ehrlake command line"
        raise ConfigError(f"{path}: step {number} ({step}): {reason}") from None
