"""`csd-jax compile`: a run's programs compiled for a TPU slice on a machine without one.

- `topologies`: the named slices (chips, hosts, per-chip HBM, FLOP/s, bandwidth) and their
  devices from libtpu, without the chips.
- `program`: the run's teacher, student, train state and batches as abstract values of the
  config's shapes, and its programs (train step, eval step, on-policy sampler) lowered on them.
- `report`: the compiler's memory per chip, cost and collectives, as text and JSON.
- `command`: the command itself.
"""
