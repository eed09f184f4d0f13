"""``ehrlake review``: clinicians' review of the cases scoring queued (:mod:`ehrlake.review`)."""

from __future__ import annotations

import json

from ehrlake.cli import common


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
    review_cmd = sub.add_parser(
        "review",
        help="clinicians' review of the cases scoring queued",
        description="Cases scoring put before a clinician (gold.review_queue, by conf/review.yaml), "
        "and their decisions (gold.review_decisions, audited).",
    )
    review_sub = review_cmd.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    listing = review_sub.add_parser("list", help="open cases, highest scores first")
    listing.add_argument("--task", help="only this task")
    listing.add_argument("--all", action="store_true", help="decided cases too")
    listing.add_argument("--limit", type=int, default=20, help="cases to show (default 20)")
    listing.add_argument("--json", action="store_true", help="print cases as JSON lines")
    show = review_sub.add_parser(
        "show",
        help="one case: score, band, rule and reasons; with --purpose the patient's identity (audited)",
    )
    show.add_argument("--case", required=True, help="case id (its first characters are enough)")
    show.add_argument("--purpose", help="why the identity is opened: a reveal, audited (clinician role)")
    decide = review_sub.add_parser(
        "decide",
        help="accept the model's call or override it, with a reason (audited)",
        description="Record a decision on a case: --accept agrees with the model's call (high band: at "
        "risk; below it: not at risk), --override 1|0 gives the clinician's own label. train "
        "--with-feedback uses the reviewed labels.",
    )
    decide.add_argument("--case", required=True, help="case id (its first characters are enough)")
    call = decide.add_mutually_exclusive_group(required=True)
    call.add_argument("--accept", action="store_true", help="agree with the model's call")
    call.add_argument("--override", type=int, choices=[0, 1], help="the clinician's label: 1 at risk, 0 not")
    decide.add_argument("--reason", required=True, help="why: kept with the decision and audited")
    for p in (listing, show, decide):
        common.lake_options(p)
        common.role_option(p)
    listing.set_defaults(handler=cmd_review_list)
    show.set_defaults(handler=cmd_review_show)
    decide.set_defaults(handler=cmd_review_decide)


def _line(c) -> str:
    return (
        f"{c.case_id[:12]}  {c.task}  {c.as_of}  score {c.score:.3f} ({c.risk_band})  {c.rule}  "
        f"{c.model_id} v{c.model_version}  {c.status}"
    )


def cmd_review_list(args) -> int:
    from ehrlake import review

    lake, _ = common.open_lake(args)
    found = review.cases(lake, args.task, None if args.all else "open", args.limit, args.role)
    for c in found:
        print(json.dumps(c.asDict(), default=str) if args.json else _line(c))
    if not found and not args.json:
        print(
            "no open cases"
            + (f" of {args.task}" if args.task else "")
            + ": scoring queues them (ehrlake score)"
        )
    return 0


def cmd_review_show(args) -> int:
    from ehrlake import review

    lake, _ = common.open_lake(args)
    c = review.case(lake, args.case, args.role)
    print(_line(c))
    print(f"  case {c.case_id}\n  patient_key {c.patient_key}")
    for reason in c.top_reasons or []:
        print(f"  reason: {reason}")
    if args.purpose:
        for row in review.identity(lake, c.patient_key, args.role, args.purpose):
            print("  identity: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return 0


def cmd_review_decide(args) -> int:
    from ehrlake import review

    lake, _ = common.open_lake(args)
    decision, label = review.decide(lake, args.case, args.role, args.reason, args.override)
    print(f"case {args.case}: {decision} (reviewed label {label}) -> {review.DECISIONS}")
    return 0
