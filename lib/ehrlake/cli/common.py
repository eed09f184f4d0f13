"""What the CLI's command modules share: the lake/configuration/role options, opening the lake,
terminal cells, dates."""

from __future__ import annotations

import argparse

from ehrlake.errors import EhrlakeError

EXIT_FAILURE = 1


def lake_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lake", help="lake root directory (default: lake.root of the configuration, ./lake)"
    )
    parser.add_argument("--conf", help="configuration YAML (default: $EHRLAKE_CONF or conf/default.yaml)")
    parser.add_argument(
        "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show Spark's log and full stack traces on errors",
    )  # fmt: skip


def role_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--role",
        help="act as this role of the access policy (default: $EHRLAKE_ROLE, else security.role of the "
        "configuration)",
    )


def open_lake(args):
    from ehrlake import config as config_module
    from ehrlake import lake

    config = config_module.load(args.conf).with_lake_root(args.lake)
    return lake.open(config=config), config


def cell(value, width: int = 40) -> str:
    """A value for the terminal: ciphertext shown as its key id, long text cut (--json prints all)."""
    if value is None:
        return ""
    from ehrlake.security.crypto import is_sealed

    text = str(value)
    if is_sealed(text):
        return f"<sealed {text.split(':', 2)[1]}>"
    return text if len(text) <= width else text[: width - 1] + "…"


def dates(text: str):
    import datetime as dt

    try:
        return [dt.date.fromisoformat(d.strip()) for d in text.split(",") if d.strip()]
    except ValueError as exc:
        raise EhrlakeError(f"dates must be YYYY-MM-DD: {exc}") from None
