"""Checks that need the built experiment but must still run before anything is compiled.

`experiment.validate` checks a config on its own; these compare it with what is already on disk:
the workdir being resumed, and the base run a two-stage distillation starts from. A vocabulary that
changed under a checkpoint would otherwise surface as an opaque shape error deep inside Orbax.
"""

from __future__ import annotations

import os

from cfmjax import objectives
from cfmjax.run import loading


def _has_checkpoints(run_dir: str) -> bool:
  directory = os.path.join(run_dir, "checkpoints")
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def check_vocab_matches_checkpoints(exp, workdir: str) -> None:
  """The data's vocabulary must match the checkpoints this run resumes or starts from."""
  vocab = exp.vocab_size
  saved = loading.saved_vocab_size(workdir) if _has_checkpoints(workdir) else None
  if saved not in (None, vocab):
    raise ValueError(
        f"{workdir} holds checkpoints of a model with a vocabulary of {saved} tokens, but this run's "
        f"data/tokenizer gives {vocab} (data.source={exp.config.data.source!r}). Resume with the data and "
        "tokenizer settings in its config.json, or use a new --workdir.")
  init_from = exp.config.get("init_from", "")
  if objectives.get(exp.config).starts_from_base(exp.config) and init_from:
    base = loading.saved_vocab_size(init_from)
    if base not in (None, vocab):
      raise ValueError(
          f"init_from={init_from} was trained with a vocabulary of {base} tokens, but this run's "
          f"tokenizer gives {vocab}: its checkpoint cannot be loaded. Use the base run's tokenizer "
          f"({os.path.join(init_from, 'tokenizer.model')}) and data settings, or another base run.")
