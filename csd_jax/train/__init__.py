"""Training: the jitted distillation step, the loop and its periodic actions, on-policy rows,
export.

- `loop`: the one module that ties config, mesh, models, data, step, checkpoints and metrics
  together (`build_trainer`, `train`).
- `actions`: the loop's periodic actions (log, held-out loss, evaluation by generation, save,
  preemption).
- `step`: the jitted train and eval steps. It imports no data code (grain, TFDS), so the
  benches run where those are not installed.
- `onpolicy`: rows of the student's own answers (ImitKD, GKD, DistiLLM mixing).
- `compile_cache`: XLA's persistent compilation cache of a run; `storage`: failed writes told
  in one line; `export`: a run's student as a Hugging Face directory.

The train state and a run's models live in `csd_jax.run`.
"""
