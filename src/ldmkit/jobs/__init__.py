"""End-to-end jobs: `train` (both stages from a config), `evaluate` (sample a run and score it), `demo`."""
