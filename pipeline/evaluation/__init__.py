"""Few-shot evaluation: tasks.py (task YAMLs as data, prompts, answers), scoring.py (batched log-likelihoods and
generations), lmeval.py (the same task for lm-evaluation-harness)."""
