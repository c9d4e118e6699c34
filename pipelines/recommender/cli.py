"""`vurksha recommender train|evaluate|promote|list|rollback`: the recommender's pipelines from a
shell (the same functions as `pipelines.recommender` in Python).

    vurksha recommender train --source orders --search 8 --promote
    vurksha recommender train --source online-retail --no-register --report-dir /tmp/rec
    vurksha recommender evaluate 3
    vurksha recommender promote 3 [--force]
    vurksha recommender list
    vurksha recommender rollback
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipelines.recommender.evaluation import SplitResult
from pipelines.recommender.flows import evaluate, train
from pipelines.recommender.pipeline import Evaluation
from pipelines.recommender.promotion import PromotionOut, list_models, promote, rollback
from pipelines.recommender.report import split_table
from pipelines.recommender.search import format_table


def _param_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parameters (over --config, which is over the defaults)")
    group.add_argument("--config", type=Path, help="TOML or JSON file of parameters ([params], [search])")
    group.add_argument("--algorithm", choices=("als", "bpr"))
    group.add_argument("--factors", type=int)
    group.add_argument("--regularization", type=float)
    group.add_argument("--alpha", type=float)
    group.add_argument("--iterations", type=int)
    group.add_argument("--seed", type=int)
    run = parser.add_argument_group("run")
    run.add_argument("--source", choices=("orders", "online-retail"), help="training data (default: orders)")
    run.add_argument(
        "--cutoff", help="data cut-off, ISO date or time (default: now, or all of Online Retail)"
    )
    run.add_argument("--search", type=int, metavar="N", help="random-search trials on a validation split")
    run.add_argument("--threads", type=int, help="implicit's threads (default: the CPUs available)")
    run.add_argument("--ray", action="store_true", help="run search trials as Ray tasks (one CPU each)")
    run.add_argument("--report-dir", type=Path, help="where to write report.md/.html and metrics.json")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def _params(args: argparse.Namespace) -> dict[str, Any]:
    names = ("algorithm", "factors", "regularization", "alpha", "iterations", "seed")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="vurksha recommender", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = root.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="search, evaluate, fit the final model and register it")
    _param_flags(tr)
    tr.add_argument("--promote", action="store_true", help="promote the new model (refused if worse)")
    tr.add_argument("--force", action="store_true", help="with --promote: even if it is worse")
    tr.add_argument("--by", help="who trains (default: the OS user)")
    tr.add_argument(
        "--no-register", action="store_true", help="research mode: Online Retail by SKU, no database"
    )
    ev = sub.add_parser("evaluate", help="evaluate a version's parameters, or given ones, on both splits")
    ev.add_argument("version", type=int, nargs="?", help="a registered version (default: the flags)")
    _param_flags(ev)
    pr = sub.add_parser("promote", help="make a version the production model")
    pr.add_argument("version", type=int)
    pr.add_argument("--force", action="store_true", help="even if its NDCG@10 is worse than production's")
    pr.add_argument("--by", help="who promotes (default: the OS user)")
    ls = sub.add_parser("list", help="registered versions, newest first")
    ls.add_argument("--limit", type=int, default=50)
    rb = sub.add_parser("rollback", help="return to the version before the current production one")
    rb.add_argument("--by", help="who rolls back (default: the OS user)")
    return root


def print_evaluation(evaluation: Evaluation) -> None:
    if evaluation.search is not None:
        print(f"\nsearch ({len(evaluation.search.trials)} trials, validation NDCG@10, best first):")
        print(format_table(evaluation.search.table()))
    split: SplitResult
    for split in (evaluation.time, evaluation.new_items):
        print(f"\n{split.rule} split: {split.users} customers, {split.train_lines} training lines")
        print(format_table(split_table(split)))


def _promotion_line(p: PromotionOut) -> str:
    was = f"v{p.previous_version}" if p.previous_version is not None else "none"
    return f"{p.action}: v{p.version} in production (was {was}), by {p.by}" + (
        " (forced)" if p.forced else ""
    )


def main(argv: list[str] | None = None) -> int:
    from config.logging import setup_logging
    from config.settings import get_settings
    from models.errors import AppError

    args = parser().parse_args(argv)
    setup_logging(get_settings().log_level)
    try:
        if args.command == "train":
            result = train(
                source=args.source or "orders",
                params=_params(args),
                config=args.config,
                search=args.search,
                cutoff=args.cutoff,
                threads=args.threads,
                use_ray=args.ray,
                by=args.by,
                promote=args.promote,
                force=args.force,
                register=not args.no_register,
                report_dir=args.report_dir,
                progress=not args.quiet,
            )
            print_evaluation(result.evaluation)
            print(f"\nparameters: {result.params.model_dump()}")
            print(f"final fit: {result.train_seconds:.2f} s, data cut-off {result.data_cutoff.isoformat()}")
            if result.version is not None:
                print(f"registered v{result.version} (ndcg10 {result.metrics['ndcg10']:.4f})")
            if result.report_dir is not None:
                print(f"report: {result.report_dir / 'report.html'}")
            if result.promoted:
                print(f"promoted v{result.version}")
            elif result.promotion_refused:
                print(f"not promoted: {result.promotion_refused}")
        elif args.command == "evaluate":
            done = evaluate(
                args.version,
                params=_params(args),
                config=args.config,
                source=args.source,
                cutoff=args.cutoff,
                search=args.search,
                threads=args.threads,
                use_ray=args.ray,
                report_dir=args.report_dir,
                progress=not args.quiet,
            )
            print_evaluation(done.evaluation)
            if done.report_dir is not None:
                print(f"\nreport: {done.report_dir / 'report.html'}")
        elif args.command == "promote":
            print(_promotion_line(promote(args.version, force=args.force, by=args.by)))
        elif args.command == "rollback":
            print(_promotion_line(rollback(by=args.by)))
        else:
            rows = [
                {
                    "version": m.version,
                    "created": m.created_at.strftime("%Y-%m-%d %H:%M"),
                    "source": m.source,
                    "algorithm": m.algorithm,
                    "ndcg10": f"{m.metrics['ndcg10']:.4f}" if "ndcg10" in m.metrics else "-",
                    "by": m.created_by,
                    "production": "*" if m.production else "",
                }
                for m in list_models(args.limit)
            ]
            print(format_table(rows) if rows else "no models registered")
    except AppError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
