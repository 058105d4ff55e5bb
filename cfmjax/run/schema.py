"""What a run's files mean, by version, and the migrations that read old ones as today's.

A workdir's config.json and each checkpoint carry `schema_version` (VERSION when written). Files
written before the schema existed have none: version 0. Reading goes through `migrate_config` /
`check_checkpoint`, which apply, in order, every migration from the file's version to VERSION; a
file from a newer cfmjax is refused by name rather than misread.

Rule for changes: whatever alters what config.json or a checkpoint holds (a key renamed or whose
default changes meaning, a parameter moved in the state tree) bumps VERSION, adds its migration
below, and commits a tiny workdir written by the code just before the change under
tests/golden/workdir_v<old version>/ (tests/test_old_workdirs.py samples, evaluates and resumes it).

Versions:
  0  before the schema (main up to 2026-12-04): no `schema_version` key anywhere.
  1  config.json and the checkpoint's data item record `schema_version`; the same keys and tree.
  2  one config key names the objective (objectives.py): `objective` = flow | ar | psd | lsd | esd |
     fixed_point replaces `stage`, `model.causal` and `distill.loss`. Checkpoints as in 1.
  3  guided and fixed-point distillation keep their frozen base network beside the parameters
     (state["frozen_teacher"]), not inside them (params["frozen_teacher"], with EMA and Adam copies);
     checkpointing.py moves it when it restores an older checkpoint. config.json as in 2.
  4  config.json records only what the user asked for: `model.vocab_size` and `model.prompt_flag`
     are no longer keys (the data and flow.prompt decide them), and a distillation run's config.json
     no longer holds its base run's model, data and flow sections: run.json does, as the latest
     start's `from_base` (run_record.py). Older config.json files hold both and load as they are,
     the two keys dropped. Keys that meant two things or held -1 for "unset" were renamed or made
     unset-able: `sample.self_condition` -> `sample.feed_back_estimate` (model.self_condition is the
     model's input), `sample.guidance` and `init_step` are None when unset (were < 0 / -1). Checkpoints as in 3. run.json entries carry their own `schema_version`,
     so a later change to what `from_base` holds can migrate it.
"""

from __future__ import annotations

KEY = "schema_version"
VERSION = 4

# Config keys whose default changed after they were added, with the value a run had before the
# key existed: a version-0 workdir written then must load as it trained, not with today's default.
_V0_BEFORE_KEY_EXISTED = {
    ("model", "skip"): False,
    ("model", "posterior_input"): False,
}


def _config_0_to_1(saved: dict) -> dict:
  saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
  for (section, key), value in _V0_BEFORE_KEY_EXISTED.items():
    saved.setdefault(section, {}).setdefault(key, value)
  return saved


def _config_1_to_2(saved: dict) -> dict:
  saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
  stage = saved.pop("stage", "base")
  causal = saved.setdefault("model", {}).pop("causal", False)
  loss = saved.setdefault("distill", {}).pop("loss", "psd")
  saved["objective"] = "ar" if causal else ("flow" if stage == "base" else loss)
  return saved


def _config_3_to_4(saved: dict) -> dict:
  model = {k: v for k, v in saved.get("model", {}).items() if k not in ("vocab_size", "prompt_flag")}
  sample = dict(saved.get("sample", {}))
  if "self_condition" in sample:
    sample["feed_back_estimate"] = sample.pop("self_condition")
  if sample.get("guidance") is not None and sample["guidance"] < 0:
    sample["guidance"] = None
  init_step = saved.get("init_step")
  return dict(saved, model=model, sample=sample, init_step=None if init_step is None or init_step < 0 else init_step)


# version k -> k + 1 (2 -> 3 changed checkpoints only)
_CONFIG_MIGRATIONS = {0: _config_0_to_1, 1: _config_1_to_2, 2: dict, 3: _config_3_to_4}


def _version(record: dict, what: str) -> int:
  version = int(record.get(KEY, 0))
  if version > VERSION:
    raise ValueError(f"{what} has {KEY}={version}, written by a newer cfmjax than this one (which reads "
                     f"versions up to {VERSION}): update cfmjax (pip install -e .) to read it")
  return version


def migrate_config(saved: dict, what: str = "config.json") -> dict:
  """A saved config dict (config.json) as today's version, without the version key."""
  version = _version(saved, what)
  saved = {k: v for k, v in saved.items() if k != KEY}
  for v in range(version, VERSION):
    saved = _CONFIG_MIGRATIONS[v](saved)
  return saved


def check_checkpoint(data: dict, what: str) -> int:
  """The version of a checkpoint from its data item (refusing newer ones). Versions 0 to 2 hold the
  same state tree, and 3 and 4 another; the state keys added later (checkpointing._ADDED_STATE_KEYS) restore as zeros, and
  a frozen teacher saved inside the parameters (versions up to 2) is moved out on restore
  (checkpointing.Checkpointer.restore)."""
  return _version(data, what)
