"""A run and its directory:

- `state`: `TrainState` (the checkpoint's schema, the replay buffer's included) and its one
  builder, `init_train_state`, with the optimizer.
- `models`: the teacher and student a config names (`build_models`), and `open_run`, a finished
  or running run's config, tokenizer and models.
- `checkpoint`: Orbax saves and restores of the train state and the data position.
- `integrity`: the checksums that catch a damaged checkpoint before it is restored.
- `lock`: one run per workdir (`WorkdirLock`), and the workdir's config history.
"""
