"""``ehrlake federated train``: a model trained across sites, each site's rows staying with its
client (:mod:`ehrlake.federated`)."""

from __future__ import annotations

from ehrlake.cli import common


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
    fed = sub.add_parser(
        "federated",
        help="train across hospital sites with Flower: only model updates leave a site",
        description="Federated learning (docs/federated.md). Sites are declared per task in "
        "conf/federated.yaml; each reads its own rows as the policy's role site:<name>.",
    )
    fed_sub = fed.add_subparsers(dest="federated_command", required=True, metavar="SUBCOMMAND")
    train = fed_sub.add_parser(
        "train",
        help="L1 logistic regression or the tabular ANN over the sites (FedAvg or FedProx), optionally "
        "differentially private",
        description="Start a Flower SuperLink and one SuperNode per site on 127.0.0.1, train the task's "
        "L1 logistic regression (or, --model ann in the deep-learning runtime, its ANN) for --rounds "
        "rounds, evaluate it on the held-out patients of every site and register it as "
        "<task>.<model>-federated (a candidate, like any trained model).",
    )
    train.add_argument("--task", required=True, help="a task with sites in conf/federated.yaml")
    train.add_argument("--sites", help="comma-separated sites (default: all of the task's)")
    train.add_argument("--rounds", type=int, help="federated rounds (default: conf/federated.yaml)")
    train.add_argument(
        "--model", choices=["logreg", "ann"], default="logreg",
        help="logreg (default), or ann: the TensorFlow ANN (run by .venv-dl/bin/ehrlake)",
    )  # fmt: skip
    train.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg")
    dp = train.add_mutually_exclusive_group()
    dp.add_argument("--epsilon", type=float, help="differential privacy: the noise that spends this epsilon")
    dp.add_argument("--noise", type=float, help="differential privacy: this Gaussian noise multiplier")
    train.add_argument("--privacy", choices=["patient", "site"], default="patient",
                       help="what epsilon protects: each patient's row (DP-SGD at the sites, default) or "
                       "a whole site (noise added by the server)")  # fmt: skip
    train.add_argument(
        "--secure-aggregation", action="store_true",
        help="Flower's SecAgg+: the server learns only the sum of the sites' updates",
    )  # fmt: skip
    train.add_argument("--seed", type=int, default=42, help="the split's seed (central training's default)")
    common.lake_options(train)
    common.role_option(train)
    train.set_defaults(handler=cmd_train)


def cmd_train(args) -> int:
    from ehrlake.federated import train

    lake, _ = common.open_lake(args)
    names = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    run = train.train(lake, args.task, names, args.rounds, args.strategy, args.epsilon, args.noise,
                      args.privacy, args.seed, args.role, algorithm=args.model,
                      secure=args.secure_aggregation)  # fmt: skip
    for line in run.lines():
        print(line)
    return 0
