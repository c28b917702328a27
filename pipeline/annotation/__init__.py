"""The annotation library behind `llmpipe annotate` and its export and stats commands: log.py (the pairs file and
the append-only label log), terminal.py (single key presses and the rich screen), sampling.py (sampling two
responses per prompt from a model) and stats.py (labels per annotator, agreement, position bias)."""
