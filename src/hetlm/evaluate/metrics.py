"""Classification metrics and seed aggregation, in plain Python (no scikit-learn dependency)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """Share of exact matches."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError("accuracy needs two non-empty sequences of the same length")
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def macro_f1(
    gold: Sequence[int], predicted: Sequence[int], labels: Sequence[int] | None = None
) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (default: classes in gold or predicted).

    A class that is never predicted has F1 0, so a model that only says the majority class
    scores 1/k of its majority F1: the point of reporting macro-F1 on imbalanced tasks. (This is
    scikit-learn's ``f1_score(average="macro")`` with ``zero_division=0``.)
    """
    if len(gold) != len(predicted) or not gold:
        raise ValueError("macro_f1 needs two non-empty sequences of the same length")
    classes = sorted(set(gold) | set(predicted)) if labels is None else list(labels)
    pairs = Counter(zip(gold, predicted, strict=True))
    gold_counts, predicted_counts = Counter(gold), Counter(predicted)
    scores = []
    for c in classes:
        tp = pairs[(c, c)]
        denominator = gold_counts[c] + predicted_counts[c]
        scores.append(2 * tp / denominator if denominator else 0.0)
    return sum(scores) / len(scores)


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the training set's most frequent class."""
    top = Counter(train_labels).most_common(1)[0][0]
    predicted = [top] * len(test_labels)
    return {
        "accuracy": accuracy(test_labels, predicted),
        "macro_f1": macro_f1(test_labels, predicted),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None
