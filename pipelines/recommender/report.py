"""The evaluation report, as Markdown (stored in the model's registry row) and HTML (opened in a
browser or shown in a notebook), both with the plots inline as SVG. Both are rendered from
one list of blocks, so they always say the same thing."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from pipelines.recommender.evaluation import SplitResult
from pipelines.recommender.pipeline import GOAL_NDCG10, GOAL_NEW_ITEMS_LIFT, Evaluation
from pipelines.recommender.svg import bar_chart, line_chart

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    ("precision10", "precision@10"),
    ("recall10", "recall@10"),
    ("ndcg10", "NDCG@10"),
    ("map10", "MAP@10"),
    ("coverage", "coverage"),
    ("popularity_bias", "popularity bias"),
)
DEFINITIONS = (
    "Binary relevance at k = 10, averaged over the evaluated customers. precision@10 = hits / 10; "
    "recall@10 = hits / |relevant|; NDCG@10 = DCG / ideal DCG with a hit at position i worth "
    "1 / log2(i + 1); MAP@10 = mean over customers of (sum of precision@i at each hit) / "
    "min(|relevant|, 10). Coverage: share of the training catalog recommended to at least one "
    "customer. Popularity bias: mean popularity percentile of the recommended items (1 = the most "
    "popular item)."
)
SPLITS_TEXT = (
    "Time split: train before the cut-off (a quantile of the lines' dates), relevant = every item a "
    "customer bought after it, repeat purchases included; customers who bought on both sides. "
    "New-items split: relevant = items new to the customer after the cut-off; items already bought "
    "are never recommended (so buy_again is popularity there). Ours is scored through `Scorer`, the "
    "code the deployment serves; als_raw is implicit's own `recommend` of an untuned ALS (implicit's "
    "defaults: 100 factors, regularization 0.01)."
)

Block = tuple[str, Any]  # ("h1" | "h2" | "p" | "table" | "svg", content)


def _date(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def split_table(result: SplitResult) -> list[dict[str, Any]]:
    return [
        {"model": name, **{label: f"{getattr(m, key):.4f}" for key, label in METRIC_COLUMNS}}
        for name, m in result.metrics.items()
    ]


def _plots(evaluation: Evaluation) -> list[Block]:
    splits = (evaluation.time, evaluation.new_items)
    models = list(evaluation.time.metrics)
    blocks: list[Block] = [
        (
            "svg",
            bar_chart(
                [s.rule for s in splits],
                {m: [s.metrics[m].ndcg10 if m in s.metrics else 0.0 for s in splits] for m in models},
                title="NDCG@10 by model and split",
                x_label="split",
                y_label="NDCG@10",
            ),
        )
    ]
    for split in splits:
        bins = len(next(iter(split.long_tail.values()), []))
        if not bins:
            continue
        blocks.append(
            (
                "svg",
                line_chart(
                    {
                        m: [(i + 1.0, s) for i, s in enumerate(shares)]
                        for m, shares in split.long_tail.items()
                    },
                    title=f"Long tail ({split.rule} split): share of recommendations per popularity decile",
                    x_label="item popularity decile (1 = least popular tenth, 10 = most popular)",
                    y_label="share of slots",
                    x_ticks=[(i + 1.0, str(i + 1)) for i in range(bins)],
                ),
            )
        )
    if evaluation.search is not None and evaluation.search.trials:
        blocks.append(
            (
                "svg",
                line_chart(
                    {"best validation NDCG@10": [(f, v) for f, v in evaluation.search.best_per_factors()]},
                    title="Search: best validation NDCG@10 per factor count",
                    x_label="factors",
                    y_label="NDCG@10",
                ),
            )
        )
    return blocks


def blocks(evaluation: Evaluation, info: Mapping[str, Any]) -> list[Block]:
    """The report's content: `info` is the model's metadata (version, source, cut-off...)."""
    title = f"Recommender model v{info['version']}" if info.get("version") else "Recommender evaluation"
    out: list[Block] = [("h1", title)]
    out.append(
        ("table", [{"": key, "value": str(value)} for key, value in info.items() if value is not None])
    )
    out.append(("h2", "Parameters"))
    out.append(
        ("table", [{"parameter": k, "value": str(v)} for k, v in evaluation.params.model_dump().items()])
    )
    goals = evaluation.goals()
    out.append(("h2", "Goals"))
    out.append(
        (
            "p",
            f"NDCG@10 >= {GOAL_NDCG10} on the time split: {'met' if goals['time_ndcg10'] else 'NOT met'} "
            f"({evaluation.ndcg10:.4f}). NDCG@10 >= {GOAL_NEW_ITEMS_LIFT}x popularity on new items: "
            f"{'met' if goals['new_items_lift'] else 'NOT met'}.",
        )
    )
    for split in (evaluation.time, evaluation.new_items):
        out.append(("h2", f"{split.rule} split"))
        out.append(
            (
                "p",
                f"Cut-off {_date(split.cutoff)}; {split.users} customers evaluated; {split.train_lines} "
                f"training lines, {split.items} items; our fit took {split.fit_seconds:.2f} s.",
            )
        )
        out.append(("table", split_table(split)))
    out.append(("h2", "Definitions"))
    out.append(("p", SPLITS_TEXT))
    out.append(("p", DEFINITIONS))
    if evaluation.search is not None:
        s = evaluation.search
        out.append(("h2", "Hyper-parameter search"))
        out.append(
            (
                "p",
                f"{len(s.trials)} trials on a validation split inside the time split's training period "
                f"(cut-off {_date(s.validation_cutoff)}, {s.validation_users} customers), {s.seconds:.1f} s. "
                "Stage fit: one fit per point (factors, regularization, alpha); stage blend: blend "
                "weights on the best fit's factors, no refit. ndcg10 / map10: time rule (picks the "
                f"winner); ndcg10_new: items new to the customer. Chosen: blend {s.best.index}.",
            )
        )
        out.append(("table", s.table()))
    out.append(("h2", "Plots"))
    out.extend(_plots(evaluation))
    return out


def _md_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]).replace("|", "\\|") for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(content: Sequence[Block]) -> str:
    parts = []
    for kind, value in content:
        if kind == "h1":
            parts.append(f"# {value}")
        elif kind == "h2":
            parts.append(f"## {value}")
        elif kind == "table":
            parts.append(_md_table(value))
        else:
            parts.append(str(value))
    return "\n\n".join(parts) + "\n"


def to_html(content: Sequence[Block]) -> str:
    title = next((str(v) for k, v in content if k == "h1"), "Recommender report")
    body = []
    for kind, value in content:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{escape(str(value))}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{escape(str(value))}</p>")
        elif kind == "table" and value:
            keys = list(value[0])
            head = "".join(f"<th>{escape(k)}</th>" for k in keys)
            rows = "".join(
                "<tr>" + "".join(f"<td>{escape(str(r[k]))}</td>" for k in keys) + "</tr>" for r in value
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "svg":
            body.append(f"<figure>{value}</figure>")
    style = (
        "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
        "text-align:right}th{background:#f4f4f4}figure{margin:1rem 0}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


@dataclass(frozen=True)
class Report:
    markdown: str
    html: str

    def _repr_html_(self) -> str:  # a notebook shows the report itself
        return self.html


def render(evaluation: Evaluation, info: Mapping[str, Any]) -> Report:
    content = blocks(evaluation, info)
    return Report(to_markdown(content), to_html(content))


def write(report: Report, directory: Path, metrics: Mapping[str, Any] | None = None) -> Path:
    """`report.md`, `report.html` (and `metrics.json`) in `directory`; returns the HTML path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.md").write_text(report.markdown)
    (directory / "report.html").write_text(report.html)
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("wrote the report to %s", directory)
    return directory / "report.html"
