"""Scripts run from the repo root, never imported by the `pipeline` package at run time: the generators of the
shipped demo data (`python -m tools.demo_world`, `python -m tools.demo_tasks`) and the fetcher of the real model
the offline tests use (`python -m tools.fetch_smollm2`)."""
