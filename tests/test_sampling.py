"""csd_jax.sampling: the one `Sampling` dataclass, checked once; its place in the config."""

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from csd_jax.config import ConfigError, load_config, to_dict
from csd_jax.errors import UserError
from csd_jax.sampling import GREEDY, Sampling

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_defaults_are_the_papers_and_greedy_is_temperature_zero():
  assert Sampling() == Sampling(temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram_size=0)
  assert GREEDY.temperature == 0.0 and GREEDY.greedy and not Sampling().greedy


@pytest.mark.parametrize("fields, named", [
    ({"temperature": -0.5}, "temperature=-0.5"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k=-1"), ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5"),
    ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size=-2"), ({"top_k": 2.5}, "top_k=2.5"),
    ({"top_p": True}, "top_p=True"), ({"temperature": "hot"}, "temperature='hot'")])
def test_a_bad_field_is_named_with_its_range(fields, named):
  with pytest.raises(UserError, match=named) as error:
    Sampling(**fields)
  assert "\n" not in str(error.value)


def test_fields_take_one_type_so_equal_settings_hash_alike():
  """A jit static argument: Sampling(1, 2.0) and Sampling(1.0, 2) must be one compile."""
  a, b = Sampling(temperature=1, top_k=2.0), Sampling(temperature=1.0, top_k=2)
  assert a == b and hash(a) == hash(b)
  assert type(a.temperature) is float and type(a.top_k) is int
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.top_k = 3


def test_config_sections_are_sampling_with_the_same_yaml_keys():
  config = load_config(TINY, ["onpolicy.sampling.top_k=5", "eval.sampling.temperature=0.7"])
  assert config.onpolicy.sampling == Sampling(top_k=5)
  assert config.eval.sampling == Sampling(temperature=0.7)
  assert to_dict(config)["eval"]["sampling"] == {"temperature": 0.7, "top_k": 0, "top_p": 1.0,
                                                 "no_repeat_ngram_size": 0}


@pytest.mark.parametrize("override, message", [
    ("eval.sampling.top_p=0", "eval.sampling: top_p=0.0: must be within 0 < top_p <= 1"),
    ("onpolicy.sampling.temperature=-1", "onpolicy.sampling: temperature=-1.0: must be"),
    ("eval.sampling.top_k=2.5", "eval.sampling.top_k=2.5: expected int")])
def test_a_bad_sampling_key_is_a_config_error_naming_the_section(override, message):
  with pytest.raises(ConfigError) as error:
    load_config(TINY, [override])
  assert str(error.value).startswith(message), str(error.value)


def test_the_module_is_a_leaf():
  """config, models, on-policy and eval all import it: it must pull in nothing of theirs."""
  code = ("import sys, csd_jax.sampling; "
          "print(sorted(m for m in sys.modules if m.startswith(('csd_jax.', 'jax'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "['csd_jax.errors', 'csd_jax.sampling']", out
