"""The one training loop every method and evaluator runs through (`fit`), in rooms: loop.py (the
epoch/step loop), step.py (one training step), run.py (the parts of a run, built from its
config), state.py (where the run is), run_dir.py (the run directory and its logs), checkpoint.py
(atomic saves, resume)."""
