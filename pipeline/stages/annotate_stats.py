"""Statistics of an annotation log: labels per annotator, agreement, position bias.

    llmpipe annotate stats --log labels.jsonl [json=true]

Agreement is Cohen's kappa for each pair of annotators (on the pairs both labelled, skips left out) and, with three
or more annotators, Fleiss' kappa over the pairs that have the most common number of labels. Kappa near 1: the
annotators agree far beyond chance; near 0: no better than chance. Position bias is the share of A/B decisions that
picked the side shown on the left, with a 95% Wilson interval: far from 50% means the screen, not the content,
decides. Computed with statsmodels; only the current labels count (undone ones do not).
"""

from __future__ import annotations

import json
import math

from pipeline.annotation.log import read_log
from pipeline.annotation.stats import annotation_stats, print_stats
from pipeline.config import config, field

FLAGS = ("log",)


@config
class AnnotateStatsConfig:
    log: str = field(help="The annotation log (JSONL) written by `llmpipe annotate`.")
    json: bool = field(False, "Print the statistics as one JSON object instead of tables.")


Config = AnnotateStatsConfig


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def run(cfg: AnnotateStatsConfig) -> dict:
    stats = annotation_stats(read_log(cfg.log))
    if cfg.json:
        print(json.dumps(_nan_to_none(stats), indent=2))
    else:
        print_stats(stats)
    return stats
