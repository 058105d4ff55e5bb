"""Device mesh and logical-to-mesh sharding rules.

The mesh has three axes, always in this order:
  data:   pure data parallelism (parameters replicated),
  fsdp:   data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
  tensor: tensor (model) parallelism inside each layer.
Parameters and activations are annotated with logical names ('batch', 'embed', 'mlp', 'heads',
'vocab', ...); `config.sharding.rules` maps each to mesh axes. Changing how a model is sharded is a
config change, never a model change.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: the batch is split over both data-parallel axes; weights are split over `fsdp` along
# their model dimension and over `tensor` along heads / MLP / vocabulary.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    # adaLN modulation outputs (6D per block, 2D at the end) stay whole: they are split into
    # shift/scale/gate along this axis, and a split of a tensor-sharded axis (and its transpose in
    # the backward pass) forces XLA into a full rematerialisation (tests/test_aot.py).
    ("modulation", None),
)


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Sizes for (data, fsdp, tensor) with at most one -1 filled from the device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got mesh={dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"cannot fill mesh {dict(zip(MESH_AXES, sizes))} from {num_devices} devices: "
                       f"{num_devices} is not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                     f"{num_devices} are available; set one axis to -1 or change the sizes "
                     f"(e.g. --config.mesh.data=-1)")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(mesh_config, len(devices))
  # Auto axis types: the compiler propagates shardings from our annotations (GSPMD style).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """The mesh and the logical-axis rules, for tracing anything that calls the model.

  Both are needed: `nn.with_logical_constraint` resolves logical names against the rules in
  context, and with none it resolves every name to "unassigned", so the activation constraints of
  model.py pinned nothing and XLA chose the layout (the batch was split over `data` only, and every
  device of an fsdp group held the activations of all its rows: 4x8x2 held 128 rows where 16 were
  meant).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def rules_from_config(config) -> tuple:
  rules = config.sharding.get("rules", None) if "sharding" in config else None
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] input array."""
  spec = nn.logical_to_mesh_axes(("batch",) + ("length",) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the batch is split: the product of the mesh axes that 'batch' maps to."""
  axes = dict(rules).get("batch")
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def global_rows(rows, batch_sharding):
  """Host rows (an array or a tuple of arrays, the same on every process) as global arrays split by
  `batch_sharding`: each device, on whichever process, takes its own slice."""
  return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, batch_sharding, lambda idx: a[idx]), rows)


def to_host(tree):
  """The whole value of (possibly multi-process) arrays on every process, as numpy: `jax.device_get`
  in one process; with several, an all-gather, since each process holds only its devices' slices."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
