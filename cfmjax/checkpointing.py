"""Orbax checkpoints of the whole training state plus the data iterator's position.

Each step directory holds two items:
  state: params, EMA params, optimizer state, step and the base RNG key (sharded arrays, written
         collectively by every process; restorable onto any mesh by passing target shardings),
  data:  the Grain iterator state as JSON (per process in multi-host runs; see `save`).
Saves are asynchronous: training continues while the previous checkpoint is written, and Orbax
only marks a step complete (atomic rename) once every file is on disk, so a crash mid-save never
leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    # Every process writes its own iterator state under its index, so a multi-host run resumes each
    # host's shard of the data where that host stopped.
    data = {f"process_{jax.process_index()}": data_state}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state):
    """Restores `state` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    Returns (state, data_state or None).
    """
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    data = restored.data or {}
    return restored.state, data.get(f"process_{jax.process_index()}")

  def restore_params(self, step: int, abstract_state, key: str = "ema_params"):
    """Restores the full state onto `abstract_state` and returns one parameter tree from it."""
    state, _ = self.restore(step, abstract_state)
    return state[key]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
