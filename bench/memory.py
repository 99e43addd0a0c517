"""XLA's memory analysis of the compiled train step at a pair's shapes, without running it.

    PYTHONPATH=. python bench/step.py --memory-only                 # every paper pair, any backend
    PYTHONPATH=. python bench/step.py --memory-only --only gemma-7b->gemma-2b --chunk-size 512

The step is lowered on abstract inputs (`jax.ShapeDtypeStruct`, models from `nnx.eval_shape`):
no parameter is allocated, so a Gemma-7B -> 2B step compiles on a laptop's CPU. It is compiled
as the trainer compiles it (`jax.jit(make_train_step(...))`, the state donated, under
`jax.set_mesh` on a 1-device mesh), once with the fused loss and once without, and XLA's
`compiled.memory_analysis()` is printed side by side: arguments, outputs (not aliased to a
donated argument), temporaries, and generated code.

The backend matters: XLA's CPU compiler, for one, upcasts bf16 matmul operands to float32 and
hoists those copies, so a CPU figure is that backend's accounting, not the GPU's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bench.presets import shared_vocab
from csd_jax.config import OptimConfig
from csd_jax.models.io.hf import abstract_model
from csd_jax.runtime.sharding import make_mesh
from csd_jax.run.state import TrainState, make_optimizer
from csd_jax.train.step import Objective, make_train_step


@dataclasses.dataclass(frozen=True)
class Memory:
  """`compiled.memory_analysis()` of one step, in bytes."""

  arguments: int
  outputs: int        # not aliased to a donated argument
  temporaries: int
  code: int
  compile_seconds: float


def step_memory(teacher_cfg: dict, student_cfg: dict, batch: int, seq: int, *, fused: bool,
                compute: Any = jnp.bfloat16, teacher_dtype: Any = jnp.bfloat16,
                chunk_size: int = 1024) -> Memory:
  """Compile (never run) the train step of CSD (S,S) + AdamW at these shapes."""
  teacher = abstract_model(teacher_cfg, dtype=teacher_dtype, param_dtype=teacher_dtype)
  student = abstract_model(student_cfg, dtype=compute, param_dtype=jnp.float32)
  tx, schedule = make_optimizer(OptimConfig(lr=1e-4, schedule="constant"), 100)
  graphdef, params, untrained = nnx.split(student, nnx.Param, ...)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  state = TrainState(params=params, untrained=untrained,
                     opt_state=jax.eval_shape(tx.init, params),
                     step=jax.ShapeDtypeStruct((), jnp.int32),
                     key=jax.eval_shape(lambda: jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  data = {k: tokens for k in ("input_ids", "labels", "attention_mask", "positions")}
  objective = Objective("csd", {}, fused=fused, chunk_size=chunk_size,
                        vocab_size=shared_vocab(teacher_cfg, student_cfg))
  step = jax.jit(make_train_step(graphdef, teacher_graphdef, tx, schedule, objective,
                                 grad_accum=1), donate_argnums=(0,))
  start = time.perf_counter()
  with jax.set_mesh(make_mesh(1, 1, 1, devices=jax.devices()[:1])):
    compiled = step.lower(state, teacher_state, data, None).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  return Memory(arguments=analysis.argument_size_in_bytes,
                outputs=analysis.output_size_in_bytes - analysis.alias_size_in_bytes,
                temporaries=analysis.temp_size_in_bytes,
                code=analysis.generated_code_size_in_bytes, compile_seconds=seconds)


def print_memory_table(pairs: dict[str, tuple[dict, dict, int, int]], names: list[str], *,
                       chunk_size: int, compute: Any, teacher_dtype: Any) -> None:
  """One row per pair: fused and unfused step side by side (GB; code in MB)."""
  print(f"bench/step.py --memory-only on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}): XLA memory analysis of the compiled train step, nothing "
        f"run; CSD (S,S) + AdamW, student {jnp.dtype(compute).name} compute / float32 master "
        f"weights, teacher {jnp.dtype(teacher_dtype).name}, chunk {chunk_size}")
  print(f"{'pair':<24}{'batch':>9}{'args GB':>9}{'out GB':>8}{'temp fused':>12}"
        f"{'unfused':>9}{'fused/unf':>10}{'code MB f/u':>14}{'compile s':>11}")
  for name in names:
    teacher_cfg, student_cfg, batch, seq = pairs[name]
    try:
      fused, unfused = (step_memory(teacher_cfg, student_cfg, batch, seq, fused=f,
                                    compute=compute, teacher_dtype=teacher_dtype,
                                    chunk_size=chunk_size) for f in (True, False))
    except Exception as error:  # noqa: BLE001 (one pair failing must not hide the others)
      print(f"{name:<24}  failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
      continue
    code = f"{fused.code / 1e6:.1f}/{unfused.code / 1e6:.1f}"
    print(f"{name:<24}{f'{batch}x{seq}':>9}{fused.arguments / 1e9:>9.2f}"
          f"{fused.outputs / 1e9:>8.2f}{fused.temporaries / 1e9:>12.2f}"
          f"{unfused.temporaries / 1e9:>9.2f}{fused.temporaries / unfused.temporaries:>10.2f}"
          f"{code:>14}{fused.compile_seconds + unfused.compile_seconds:>11.0f}", flush=True)
