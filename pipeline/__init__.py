"""llmpipe: a language model from raw text to an aligned chat model, stage by stage (README, Layout)."""
