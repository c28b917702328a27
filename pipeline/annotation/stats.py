"""Agreement statistics of an annotation log: labels per annotator, Cohen's and Fleiss' kappa, position bias.

Agreement is Cohen's kappa for each pair of annotators (on the pairs both labelled, skips left out) and, with three
or more annotators, Fleiss' kappa over the pairs that have the most common number of labels. Position bias is the
share of A/B decisions that picked the side shown on the left, with a 95% Wilson interval. Computed with
statsmodels; only the current labels count (undone ones do not).
"""

from __future__ import annotations

import itertools
import math
import warnings
from functools import partial

from pipeline.annotation.log import DECISIVE, LABELS, AnnotationLog


def _rates(labels: list[dict]) -> dict:
    """Counts and rates of a list of label records (one annotator's, or everyone's)."""
    from statsmodels.stats.proportion import proportion_confint

    counts = {name: sum(r["label"] == name for r in labels) for name in LABELS}
    judged = len(labels) - counts["skip"]
    decisive = counts["a"] + counts["b"]
    left = sum(r["label"] == r.get("left") for r in labels if r["label"] in DECISIVE)
    low, high = proportion_confint(left, decisive, alpha=0.05, method="wilson") if decisive else (math.nan,) * 2
    return {
        "labels": len(labels), **counts,
        "left_share": left / decisive if decisive else math.nan, "left_ci95": [float(low), float(high)],
        "tie_rate": counts["tie"] / judged if judged else math.nan,
        "both_bad_rate": counts["both_bad"] / judged if judged else math.nan,
        "skip_rate": counts["skip"] / len(labels) if labels else math.nan,
    }  # fmt: skip


def _kappa(compute) -> float:
    with warnings.catch_warnings():  # every label the same category: kappa is undefined (nan), not a warning
        warnings.simplefilter("ignore")
        return float(compute())


def annotation_stats(log: AnnotationLog) -> dict:
    """Per-annotator and overall rates, Cohen's kappa per pair of annotators, Fleiss' kappa (3+ annotators)."""
    import numpy as np
    from statsmodels.stats.inter_rater import aggregate_raters, cohens_kappa, fleiss_kappa, to_table

    judged = {name: {p: r["label"] for p, r in labels.items() if r["label"] != "skip"}
              for name, labels in sorted(log.labels.items()) if labels}  # fmt: skip
    code = {name: i for i, name in enumerate(LABELS)}
    per_annotator = {name: _rates(list(labels.values())) for name, labels in sorted(log.labels.items()) if labels}
    for name, stats in per_annotator.items():
        stats["rationales"] = sum(len(texts) for texts in log.rationales.get(name, {}).values())
    cohen = []
    for first, second in itertools.combinations(judged, 2):
        shared = sorted(set(judged[first]) & set(judged[second]))
        rows = np.array([[code[judged[first][p]], code[judged[second][p]]] for p in shared]).reshape(-1, 2)
        table = to_table(rows, bins=np.arange(len(LABELS) + 1))[0]
        kappa = _kappa(partial(cohens_kappa, table, return_results=False)) if shared else math.nan
        agree = float(np.mean(rows[:, 0] == rows[:, 1])) if shared else math.nan
        cohen.append({"annotators": [first, second], "pairs": len(shared), "kappa": kappa, "agreement": agree})
    fleiss = None
    if len(judged) >= 3:
        by_pair: dict[str, list[int]] = {}
        for labels in judged.values():
            for pair, label in labels.items():
                by_pair.setdefault(pair, []).append(code[label])
        sizes = [len(v) for v in by_pair.values() if len(v) >= 2]
        raters = max(set(sizes), key=lambda n: (sizes.count(n), n)) if sizes else 0
        items = [v for v in by_pair.values() if len(v) == raters]
        kappa = _kappa(partial(fleiss_kappa, aggregate_raters(np.array(items), len(LABELS))[0])) if items else math.nan
        fleiss = {"pairs": len(items), "raters_per_pair": raters, "kappa": kappa}
    everyone = [r for labels in log.labels.values() for r in labels.values()]
    return {"annotators": per_annotator, "overall": _rates(everyone), "cohen_kappa": cohen, "fleiss_kappa": fleiss}


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def print_stats(stats: dict) -> None:
    """The statistics of `annotation_stats` as rich tables and lines."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title="labels per annotator (position bias = share of A/B picks that took the left side)")
    for column in ("annotator", "labels", "A/B", "left picks (95% CI)", "tie", "both bad", "skip", "rationales"):
        table.add_column(column, justify="left" if column == "annotator" else "right")
    rows = [*stats["annotators"].items(), ("all", stats["overall"])]
    for name, s in rows:
        low, high = s["left_ci95"]
        table.add_row(
            name, str(s["labels"]), str(s["a"] + s["b"]), f"{_pct(s['left_share'])} ({_pct(low)}-{_pct(high)})",
            _pct(s["tie_rate"]), _pct(s["both_bad_rate"]), _pct(s["skip_rate"]), str(s.get("rationales", "")),
        )  # fmt: skip
    console.print(table)
    overall = stats["overall"]
    console.print(f"position bias: left side picked in {_pct(overall['left_share'])} of {overall['a'] + overall['b']} "
                  f"A/B decisions (95% CI {_pct(overall['left_ci95'][0])}-{_pct(overall['left_ci95'][1])}; "
                  "50% = no bias)")  # fmt: skip
    for row in stats["cohen_kappa"]:
        first, second = row["annotators"]
        console.print(f"Cohen's kappa {first} vs {second}: {_num(row['kappa'])} on {row['pairs']} shared pairs "
                      f"(raw agreement {_pct(row['agreement'])})")  # fmt: skip
    if not stats["cohen_kappa"]:
        console.print("Cohen's kappa: n/a (one annotator only)")
    if stats["fleiss_kappa"] is not None:
        f = stats["fleiss_kappa"]
        console.print(f"Fleiss' kappa: {_num(f['kappa'])} on {f['pairs']} pairs, {f['raters_per_pair']} labels each")
