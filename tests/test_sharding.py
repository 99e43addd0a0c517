"""The one rules table and what is derived from it: parameter specs, the batch's sharding, the
data-parallel size, the fused loss's axes, and the checks of user overrides (`mesh.rules`)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from csd_jax.config import ConfigError, load_config
from csd_jax.errors import UserError
from csd_jax.losses import fused_logit_loss, logit_loss
from csd_jax.runtime.sharding import (RULES, batch_sharding, data_parallel_size, logical_to_spec,
                              loss_axes, resolve_rules, state_shardings)

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _mesh(shape, names=("data", "fsdp", "tensor")):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  devices = jax.devices()[:int(np.prod(shape))]
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


@pytest.mark.parametrize("axes,shape,mesh_shape,want", [
    # Each logical axis takes its rule's mesh axes.
    (("vocab", "embed"), (40, 16), (2, 2, 2), P("tensor", "fsdp")),
    (("embed", "mlp"), (16, 32), (2, 2, 2), P("fsdp", "tensor")),
    # A mesh axis already used by an earlier dimension leaves the later one replicated.
    (("heads", "mlp"), (4, 8), (2, 2, 2), P("tensor", None)),
    # A dimension the mesh axis does not divide stays replicated (vocabulary 37, one KV head).
    (("vocab", "embed"), (37, 16), (2, 2, 2), P(None, "fsdp")),
    (("embed", "kv_heads", "head_dim"), (16, 1, 8), (2, 2, 2), P("fsdp", None, None)),
    # Size-1 mesh axes are dropped.
    (("vocab", "embed"), (40, 16), (8, 1, 1), P(None, None)),
    (("batch", None), (16, 4), (8, 1, 1), P("data", None)),
    # Two mesh axes for one logical axis give a tuple; only those that divide are kept.
    (("batch", None), (8, 4), (2, 2, 2), P(("data", "fsdp"), None)),
    (("batch", None), (2, 4), (2, 2, 2), P("data", None)),
    # No logical name, or one without a rule: replicated.
    ((None, "layers"), (8, 8), (2, 2, 2), P(None, None)),
])
def test_logical_to_spec(axes, shape, mesh_shape, want):
  assert logical_to_spec(axes, shape, _mesh(mesh_shape)) == want


def test_logical_to_spec_follows_the_rules_given():
  mesh = _mesh((2, 2, 2))
  rules = resolve_rules({"embed": ["fsdp", "data"], "vocab": []})
  assert logical_to_spec(("vocab", "embed"), (40, 16), mesh, rules) == P(None, ("fsdp", "data"))
  # The default table is untouched by an override.
  assert logical_to_spec(("vocab", "embed"), (40, 16), mesh) == P("tensor", "fsdp")


def test_no_unmatched_layers_rule():
  assert "layers" not in RULES


class _Tiny(nnx.Module):

  def __init__(self):
    self.embed = nnx.Param(jnp.zeros((40, 16)), logical_axes=("vocab", "embed"))
    self.scale = nnx.Param(jnp.ones((16,)))  # no logical axes: replicated


def test_state_shardings_with_rules():
  mesh = _mesh((2, 2, 2))
  state = nnx.state(nnx.eval_shape(_Tiny))
  default = state_shardings(state, mesh)
  assert default["embed"].spec == P("tensor", "fsdp")
  assert default["scale"].spec == P(None)
  custom = state_shardings(state, mesh, resolve_rules({"vocab": ["data"], "embed": []}))
  assert custom["embed"].spec == P("data", None)


@pytest.mark.parametrize("mesh_shape,names,rules,want", [
    ((2, 2, 2), ("data", "fsdp", "tensor"), None, 4),
    ((8, 1, 1), ("data", "fsdp", "tensor"), None, 8),
    ((1, 2, 4), ("data", "fsdp", "tensor"), None, 2),
    ((1, 1, 8), ("data", "fsdp", "tensor"), None, 1),
    ((2, 2, 2), ("data", "fsdp", "tensor"), {"batch": ["data"]}, 2),
    ((2, 2, 2), ("data", "fsdp", "tensor"), {"batch": ["data", "fsdp", "tensor"]}, 8),
    ((4, 2), ("data", "tensor"), None, 4),  # a mesh without fsdp
])
def test_data_parallel_size(mesh_shape, names, rules, want):
  rules = None if rules is None else resolve_rules(rules)
  assert data_parallel_size(_mesh(mesh_shape, names), rules) == want


@pytest.mark.parametrize("mesh_shape,names,rules,want", [
    ((2, 2, 2), ("data", "fsdp", "tensor"), None, P(("data", "fsdp"), None)),
    ((2, 2, 2), ("data", "fsdp", "tensor"), {"batch": ["data"]}, P("data", None)),
    ((2, 2, 2), ("data", "fsdp", "tensor"), {"batch": []}, P(None, None)),
    ((4, 2), ("data", "tensor"), None, P("data", None)),
])
def test_batch_sharding(mesh_shape, names, rules, want):
  mesh = _mesh(mesh_shape, names)
  rules = None if rules is None else resolve_rules(rules)
  sharding = batch_sharding(mesh, rules)
  assert sharding.spec == want
  # Each device holds B / data_parallel_size rows and every token of them.
  batch = jax.device_put(np.zeros((16, 3), np.int32), sharding)
  rows = 16 // data_parallel_size(mesh, rules)
  assert {s.data.shape for s in batch.addressable_shards} == {(rows, 3)}


@pytest.mark.parametrize("rules,want", [
    (None, (("data", "fsdp"), "tensor")),
    ({"vocab": []}, (("data", "fsdp"), None)),
    ({"batch": ["data"], "vocab": ["fsdp"]}, (("data",), "fsdp")),
    # A vocab axis that also splits the tokens cannot split the vocabulary inside the loss.
    ({"vocab": ["fsdp"]}, (("data", "fsdp"), None)),
])
def test_loss_axes(rules, want):
  assert loss_axes(None if rules is None else resolve_rules(rules)) == want


def test_loss_axes_drive_the_fused_loss():
  mesh = _mesh((2, 2, 2))
  rng = np.random.default_rng(0)
  h_s, w_s = rng.normal(size=(12, 8)), rng.normal(size=(8, 20))
  h_t, w_t = rng.normal(size=(12, 6)), rng.normal(size=(6, 20))
  h_s, w_s, h_t, w_t = (jnp.asarray(x, jnp.float32) for x in (h_s, w_s, h_t, w_t))
  tokens, vocab = loss_axes(resolve_rules({"batch": ["data"], "vocab": ["fsdp"]}))
  got = fused_logit_loss("csd", h_s, w_s, h_t, w_t, chunk_size=4, mesh=mesh, token_axes=tokens,
                         vocab_axis=vocab)
  np.testing.assert_allclose(got, logit_loss("csd", h_s @ w_s, h_t @ w_t), rtol=2e-5)


def test_resolve_rules_overrides():
  assert resolve_rules(None) == RULES
  assert resolve_rules({}) == RULES
  rules = resolve_rules({"vocab": "fsdp", "mlp": ["fsdp", "tensor"], "heads": None})
  assert rules["vocab"] == ("fsdp",) and rules["mlp"] == ("fsdp", "tensor")
  assert rules["heads"] == () and rules["embed"] == RULES["embed"]


@pytest.mark.parametrize("overrides,match", [
    ({"layers": ["data"]}, "unknown logical axis 'layers'; valid: batch, vocab, embed"),
    ({"vocab": ["model"]}, "unknown mesh axis 'model'; valid: data, fsdp, tensor"),
    ({"mlp": ["tensor", "tensor"]}, "names a mesh axis twice"),
    ({"vocab": ["tensor", "fsdp"]}, "at most one mesh axis"),
    ({"embed": 3}, "expected a list of mesh axes"),
])
def test_resolve_rules_errors(overrides, match):
  with pytest.raises(UserError, match=match) as info:
    resolve_rules(overrides)
  assert "\n" not in str(info.value)


def test_config_mesh_rules():
  config = load_config(TINY, ["mesh.rules.vocab=[]", "mesh.rules.mlp=[fsdp, tensor]"])
  assert config.mesh.rules == {"vocab": [], "mlp": ["fsdp", "tensor"]}
  assert load_config(TINY).mesh.rules == {}
  with pytest.raises(ConfigError, match="^mesh.rules: .*unknown mesh axis 'model'"):
    load_config(TINY, ["mesh.rules.vocab=[model]"])
  with pytest.raises(ConfigError, match="^mesh.rules: .*unknown logical axis 'layer'"):
    load_config(TINY, ["mesh.rules.layer=[data]"])


def test_every_large_train_state_leaf_is_sharded_under_fsdp():
  """Parameters and the optimizer state that mirrors them (Adam's moments) are split over the
  8 FSDP devices: left to XLA, the optimizer's zeros came back replicated, a whole copy of the
  float32 moments on every chip. Only small leaves (biases of 2 x 16, counts, the key) stay
  whole."""
  from csd_jax.run.models import build_student, train_state_template

  config = load_config(TINY, ["mesh.data=1", "mesh.fsdp=-1"])
  mesh = _mesh((1, 8, 1))
  _, state = train_state_template(config, build_student(config, mesh), mesh)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  whole = [jax.tree_util.keystr(path) for path, leaf in leaves
           if leaf.size > 256 and leaf.sharding.is_fully_replicated]
  assert not whole, whole
  import optax

  specs = [p.sharding.spec for p in jax.tree.leaves(state.params)]
  for moment in ("mu", "nu"):
    assert [m.sharding.spec for m in jax.tree.leaves(
        optax.tree_utils.tree_get(state.opt_state, moment))] == specs
