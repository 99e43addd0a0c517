"""Training: teacher and student state, the jitted distillation step, the loop, export.

`loop.py` is the one module that ties config, mesh, models, data, step, checkpoints and
metrics together; `step.py` and `state.py` import no data code (grain, TFDS), so the benches
run where those are not installed.
"""
