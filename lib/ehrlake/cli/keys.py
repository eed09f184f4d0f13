"""Commands that manage keys and role grants: keys init|rotate|show, grants init|add|show."""

from __future__ import annotations

import json

from ehrlake.cli import common
from ehrlake.errors import EhrlakeError


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
    keys = sub.add_parser(
        "keys",
        help="manage encryption keys",
        description="Envelope-encryption keys: "
        "a master key wraps versioned per-table data keys (docs/security.md).",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    init = keys_sub.add_parser("init", help="create the master key file (mode 0600); refuses to overwrite")
    rotate = keys_sub.add_parser("rotate", help="add a new data-key version for a table; new writes use it")
    rotate.add_argument("--table", required=True, help="logical table name, e.g. bronze.fhir_patient")
    rotate.add_argument(
        "--reencrypt",
        action="store_true",
        help="also rewrite the table's sealed columns under the new key, as one new Delta version",
    )
    rotate.add_argument(
        "--lake", help="lake root, with --reencrypt (default: lake.root of the configuration)"
    )
    common.role_option(rotate)  # --reencrypt rewrites the table: a job of a role that may write its layer
    show_keys = keys_sub.add_parser("show", help="key ids and creation times per table (never key material)")
    show_keys.add_argument("--json", action="store_true", help="machine-readable output")
    for p in (init, rotate, show_keys):
        p.add_argument("--conf", help="configuration YAML (default: $EHRLAKE_CONF or conf/default.yaml)")
    init.set_defaults(handler=cmd_keys_init)
    rotate.set_defaults(handler=cmd_keys_rotate)
    show_keys.set_defaults(handler=cmd_keys_show)

    grants = sub.add_parser(
        "grants",
        help="who may act in which role: grants signed by a key administrator",
        description="Signed role grants (docs/security.md): once set up, a user acts only in the roles a "
        "grant gives them, whatever --role says.",
    )
    grants_sub = grants.add_subparsers(dest="grants_command", required=True, metavar="SUBCOMMAND")
    grants_init = grants_sub.add_parser(
        "init", help="create the administrator's key pair (private 0600, public in the grants folder)"
    )
    grants_add = grants_sub.add_parser("add", help="sign a grant of roles to an OS user (replaces theirs)")
    grants_add.add_argument("--user", required=True, help="OS user name")
    grants_add.add_argument(
        "--role", action="append", required=True, help="a role of the access policy (repeat)"
    )
    grants_show = grants_sub.add_parser("show", help="users and their granted roles")
    for p in (grants_init, grants_add, grants_show):
        p.add_argument("--conf", help="configuration YAML (default: $EHRLAKE_CONF or conf/default.yaml)")
    grants_init.set_defaults(handler=cmd_grants_init)
    grants_add.set_defaults(handler=cmd_grants_add)
    grants_show.set_defaults(handler=cmd_grants_show)


def _key_store(args):
    from ehrlake import config as config_module
    from ehrlake.security.columns import KeyRef

    security = config_module.load(args.conf).security
    return KeyRef.from_config(security).store(), security


def cmd_keys_init(args) -> int:
    from ehrlake.security import init_keys

    _, security = _key_store(args)
    made = init_keys(security)
    if not made:
        raise EhrlakeError(
            f"master key {security.master_key_file} and the reveal key exist already; not replacing them"
        )
    for line in made:
        print(f"created {line}")
    return 0


def cmd_keys_rotate(args) -> int:
    from ehrlake.lake.catalog import TableName

    table = str(TableName.parse(args.table))
    store, _ = _key_store(args)
    key_id = store.rotate(table)
    print(f"{key_id} created; new writes to {table} use it, older versions stay readable")
    if args.reencrypt:
        lake, _ = common.open_lake(args)
        result = lake.security.reencrypt(lake, table, args.role)
        print(f"{table}: sealed columns rewritten under {key_id} as Delta version {result.version}")
    return 0


def cmd_keys_show(args) -> int:
    store, security = _key_store(args)
    data = {t: store.versions(t) for t in store.tables()}
    if args.json:
        print(json.dumps({"key_store": str(store.directory), "tables": data}, indent=2))
    elif not data:
        print(f"key store {store.directory}: no data keys yet")
    else:
        for table, versions in data.items():
            print(f"{table}: " + ", ".join(f"{v['key_id']} ({v['created_at']})" for v in versions))
    return 0


def _grants(args):
    from pathlib import Path

    from ehrlake import config as config_module
    from ehrlake.security.grants import Grants

    security = config_module.load(args.conf).security
    if not security.grants:
        raise EhrlakeError("security.grants names no folder for role grants in the configuration")
    return Grants(Path(security.grants)), security


def cmd_grants_init(args) -> int:
    grants, security = _grants(args)
    grants.init(security.grant_admin_key)
    print(
        f"created the grant administrator key {security.grant_admin_key} (mode 0600; keep it with the "
        f"administrator) and {grants.public_file}; from now on users act only in granted roles"
    )
    return 0


def cmd_grants_add(args) -> int:
    from ehrlake.security import _policy_path
    from ehrlake.security.access import AccessPolicy

    grants, security = _grants(args)
    known = AccessPolicy.load(_policy_path(security.access_policy)).roles
    unknown = [r for r in args.role if r not in known]
    if unknown:
        raise EhrlakeError(f"unknown role(s) {', '.join(unknown)} (roles: {', '.join(sorted(known))})")
    path = grants.issue(security.grant_admin_key, args.user, args.role)
    print(f"{args.user}: {', '.join(sorted(set(args.role)))} (signed grant {path})")
    return 0


def cmd_grants_show(args) -> int:
    grants, _ = _grants(args)
    shown = grants.show()
    if grants.fingerprint() is None:
        print(f"no role grants set up in {grants.directory} (ehrlake grants init): roles are self-declared")
    for user, roles in shown.items():
        print(f"{user}: {', '.join(roles)}")
    return 0
