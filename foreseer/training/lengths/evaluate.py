"""How good a length predictor is on the validation split, and what it costs next to generating the answers."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from foreseer.lengths.predictors import LengthPredictor
from foreseer.training.lengths.dataset import LengthRecord


@dataclass
class LengthMetrics:
    num: int
    mae: float  # mean absolute error, tokens
    within_50: float  # share of predictions within 50 tokens of the label
    within_100: float
    kendall_tau: float  # rank agreement (tau-b), what a shortest-first scheduler cares about


@dataclass
class EvalReport:
    predictor: str
    metrics: LengthMetrics
    overhead_ms: float  # prediction time per request, all prompts predicted in one call
    generation_ms: float  # generation time per answer in the dataset, amortized over its batch
    overhead_share: float  # overhead_ms / generation_ms
    extra: dict = field(default_factory=dict)  # predictor-specific figures
    items: list[dict] = field(default_factory=list)  # id, label, prediction per prompt


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list handled as scipy.stats.kendalltau does); O(n^2), fine for a few
    thousand items. 0 when either list is constant."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau needs lists of equal length, got {len(x)} and {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else 0.0


def length_metrics(predicted: Sequence[int], actual: Sequence[int]) -> LengthMetrics:
    if len(predicted) != len(actual) or not actual:
        raise ValueError(f"need as many predictions as labels and at least one, got {len(predicted)} and "
                         f"{len(actual)}")
    errors = [abs(p - a) for p, a in zip(predicted, actual)]
    n = len(errors)
    return LengthMetrics(
        num=n, mae=sum(errors) / n, within_50=sum(e <= 50 for e in errors) / n,
        within_100=sum(e <= 100 for e in errors) / n, kendall_tau=kendall_tau(predicted, actual),
    )


def generation_ms_per_answer(records: Sequence[LengthRecord]) -> float:
    """Milliseconds of generation per answer, from the wall-clock time the dataset build spent per record."""
    answers = sum(len(r.lengths) for r in records)
    if not answers:
        raise ValueError("no records to take generation times from")
    return 1e3 * sum(r.generation_s for r in records) / answers


def evaluate(predictor: LengthPredictor, records: Sequence[LengthRecord],
             generation_ms: float | None = None) -> EvalReport:
    """Predict every record's prompt in one call (timed), and score against the records' max lengths.

    generation_ms (per answer) defaults to these records' own; pass the whole dataset's, as a record's share of
    the build's wall-clock time is noisy (records finishing in the same step split it unevenly)."""
    if not records:
        raise ValueError("no records to evaluate on")
    prompts = [r.prompt_token_ids for r in records]
    start = time.perf_counter()
    predicted = predictor.predict(prompts)
    seconds = time.perf_counter() - start
    labels = [r.max_length for r in records]
    overhead_ms = 1e3 * seconds / len(records)
    generation_ms = generation_ms_per_answer(records) if generation_ms is None else generation_ms
    if generation_ms <= 0:
        raise ValueError(f"generation time per answer must be > 0 ms, got {generation_ms!r}")
    items = [{"id": r.id, "label": r.max_length, "prediction": p} for r, p in zip(records, predicted)]
    return EvalReport(predictor.name, length_metrics(predicted, labels), overhead_ms, generation_ms,
                      overhead_ms / generation_ms, items=items)


def write_json(report: EvalReport | dict, path: str) -> None:
    """The report as indented JSON, creating the directory."""
    data = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
