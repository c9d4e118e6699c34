"""The recommender's pipelines, for the CLI (`vurksha recommender ...`), the seed and notebooks.

    from pipelines import recommender as rec
    result = rec.train(source="online_retail", register=False, search=8, report_dir="/tmp/rec")
    result                          # in a notebook: the HTML report
    rec.train(source="orders", promote=True)   # registered; promoted unless worse than production
    rec.list_models(); rec.evaluate(3); rec.promote(3, force=True); rec.rollback()

Each flow has an async twin (`train_async`, ...) taking an optional session. Modules by kind:
`data` (events and the training matrix), `splits`, `training` (implicit fits, parameters),
`search`, `evaluation` (ours and the baselines), `metrics`, `pipeline` (offline, no database),
`report` and `svg`, `flows` (train, evaluate), `promotion` (promote, roll back, list),
`runtime` (sessions, sync over async), `cli`.
"""

from pipelines.recommender.data import Dataset, Events, build, online_retail_events, order_events
from pipelines.recommender.flows import (
    EvaluateResult,
    TrainResult,
    evaluate,
    evaluate_async,
    train,
    train_async,
)
from pipelines.recommender.pipeline import Evaluation, evaluate_events, train_offline
from pipelines.recommender.promotion import (
    PromotionOut,
    list_models,
    list_models_async,
    promote,
    promote_async,
    rollback,
    rollback_async,
)
from pipelines.recommender.splits import Split, new_items_split, time_split, validation_split
from pipelines.recommender.training import fit, load_config, params_from

__all__ = [
    "Dataset",
    "EvaluateResult",
    "Evaluation",
    "Events",
    "PromotionOut",
    "Split",
    "TrainResult",
    "build",
    "evaluate",
    "evaluate_async",
    "evaluate_events",
    "fit",
    "list_models",
    "list_models_async",
    "load_config",
    "new_items_split",
    "online_retail_events",
    "order_events",
    "params_from",
    "promote",
    "promote_async",
    "rollback",
    "rollback_async",
    "time_split",
    "train",
    "train_async",
    "train_offline",
    "validation_split",
]
