"""Every experiment file loads, names only known keys, and describes the model it claims."""

import glob
import os

import jax
import pytest

from cfmjax import objectives
from cfmjax.flow import schedules
from cfmjax.models import model
from cfmjax.run import configs, schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "experiments", "**", "*.py"), recursive=True))


def test_there_are_configs():
  names = {os.path.relpath(p, os.path.join(REPO, "experiments")) for p in CONFIG_FILES}
  for expected in ["base_flow/markov_tiny.py", "base_flow/text_tiny.py", "base_flow/lm1b_170m.py",
                   "base_flow/owt_170m.py", "flow_map/markov_tiny_psd.py", "flow_map/markov_tiny_lsd.py",
                   "flow_map/markov_tiny_esd.py", "flow_map/text_tiny_psd.py"]:
    assert expected in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_config_is_complete_and_valid(path):
  c = configs.from_file(path)
  module_doc = open(path).read().split('"""')[1]
  assert "cfmjax " in module_doc, "the docstring must give the command that runs this config"
  # Only keys that base_config() defines (a typo would silently do nothing otherwise).
  base_keys = set(_flatten(configs.base_config().to_dict()))
  assert set(_flatten(c.to_dict())) <= base_keys
  schedules.get_schedule(c.flow.schedule, 8)
  if objectives.stage(c) == "distill":
    with c.unlocked():
      c.init_from = "/somewhere"
    objectives.get(c).validate(c)


@pytest.mark.parametrize("name,low,high", [("lm1b_170m", 150e6, 200e6), ("owt_170m", 150e6, 230e6),
                                           ("owt_1p7b", 1.6e9, 1.8e9)])
def test_full_size_configs_have_the_papers_size(name, low, high):
  c = configs.from_file(os.path.join(REPO, "experiments", "base_flow", f"{name}.py"))
  init_fn, _ = model.build(model.model_config_from(c, c.data.tokenizer.vocab_size))
  abstract = jax.eval_shape(lambda r: init_fn(r, 1, 8), jax.random.key(0))
  import flax.linen as nn  # noqa: PLC0415

  n = model.count_params(nn.meta.unbox(abstract))
  assert low < n < high, n


def _flatten(d, prefix=""):
  out = []
  for k, v in d.items():
    if isinstance(v, dict):
      out += _flatten(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def test_workdirs_older_than_a_changed_default_load_as_they_trained():
  """Version 0 (no schema_version): a key added later with a changed default takes the value runs had
  before it existed; a recorded key wins; a config.json from a newer cfmjax is refused by name."""
  saved = configs.base_config().to_dict()
  before = {("model", "skip"): False, ("model", "posterior_input"): False}  # what schema.py migrates
  for section, key in before:
    del saved[section][key]
  old = configs.from_saved(saved)
  for (section, key), value in before.items():
    assert old[section][key] == value != configs.base_config()[section][key]
  assert configs.from_saved(configs.base_config().to_dict()).model.skip  # a recorded key wins
  current = dict(configs.base_config().to_dict(), **{schema.KEY: schema.VERSION})
  for section, key in before:
    del current[section][key]
  assert configs.from_saved(current).model.skip  # version 1 is not migrated: today's default
  with pytest.raises(ValueError, match=f"schema_version={schema.VERSION + 1}, written by a newer cfmjax"):
    configs.from_saved(dict(saved, **{schema.KEY: schema.VERSION + 1}))


def test_a_version_3_config_reads_without_its_derived_keys_and_placeholders():
  """Schema 4: config.json holds no derived values, and no -1 standing for "unset"."""
  v3 = configs.base_config().to_dict()
  v3["model"].update(vocab_size=12, prompt_flag=True)
  v3["sample"]["self_condition"] = False
  del v3["sample"]["feed_back_estimate"]
  v3.update(init_step=-1, **{schema.KEY: 3})
  v3["sample"]["guidance"] = -1.0
  config = configs.from_saved(v3)
  assert "vocab_size" not in config.model and "prompt_flag" not in config.model
  assert config.sample.feed_back_estimate is False and "self_condition" not in config.sample
  assert config.init_step is None and config.sample.guidance is None
  v3.update(init_step=5)
  v3["sample"]["guidance"] = 1.5
  assert (configs.from_saved(v3).init_step, configs.from_saved(v3).sample.guidance) == (5, 1.5)


def test_override_refuses_a_key_that_does_not_exist():
  c = configs.base_config()
  with pytest.raises(KeyError, match="model.posterior_inptu"):
    configs.override(c, {"model.posterior_inptu": True})
  assert configs.override(c, {"model.local_mix": 2}).model.local_mix == 2
