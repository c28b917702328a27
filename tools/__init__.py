"""Generators of the shipped demo data (data/demo/, data/tasks/demo/), run from the repo root as
`python -m tools.demo_world` / `python -m tools.demo_tasks`; never imported by the `pipeline` package at run time."""
