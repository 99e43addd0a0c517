"""Training: the jitted distillation step, the loop and its periodic actions, export.

`loop.py` is the one module that ties config, mesh, models, data, step, checkpoints and
metrics together; `actions.py` holds its periodic actions (log, held-out eval, evaluation by
generation, save, preemption). The train state lives in `csd_jax.state`, a run's models in
`csd_jax.run`. `step.py` and `flops.py` import no data code (grain, TFDS), so the benches run
where those are not installed.
"""
