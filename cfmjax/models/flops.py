"""Model FLOPs of network passes and samplers, counted from the config alone; a train step's count
is asked of its objective (`objectives.step_flops`), which composes these.

Pure functions of (model config, batch, seq_len, vocab): nothing is traced or compiled, so the
trainer can log MFU and `cfmjax compile` can report FLOPs for models that do not fit this machine.

Conventions (say what is counted, so that figures can be compared):

- FLOPs = 2 × multiply-accumulates of the MATMULS the step executes (MFU convention, as in PaLM /
  Chinchilla accounting). Element-wise work (layer norms, softmaxes, GELU, rotary, the optimizer
  update, the EMA) is not counted: it is < 5% of a transformer's FLOPs at useful sizes, and XLA's own
  count includes it (see tests/test_flops.py for the size of that gap on a tiny model).
- Matmuls are counted as executed, not as the math needs them:
  * the V-space state path multiplies the dense [B, L, V] state by W (V × D) at every position;
    the embedding-space path (model.state_space = embedding) gathers rows of W for the data part
    and draws the noise as z Lᵀ with L the D × D Cholesky factor of WᵀW: D² MACs per position,
    plus the Gram matrix WᵀW (V·D² MACs) and its Cholesky factorisation (D³/3) once per step;
    the flow-map / Euler updates then need ψW (V·D per position) wherever the V-space path only did
    element-wise arithmetic;
  * attention is full L × L for QKᵀ and AV. A causal model under `attention=xla` still computes the
    full L × L product and masks it, so that is what is counted; the fused cuDNN kernel skips the
    masked blocks, so under `attention=cudnn` a causal model counts L(L+1)/2;
  * the output head is D × V per position.
- Training = forward + backward; the backward of a matmul is 2 matmuls (input and weight
  gradients), except where the input gradient is not needed and JAX never builds it: the first
  matmul on the (noise) state and the time MLP's first layer (their inputs are not parameters).
  So a step is 3× forward minus those two terms, not exactly 3×.
- Rematerialisation: model FLOPs (`hardware=False`, the MFU convention) do not count recomputation.
  `hardware=True` adds it: `remat=full` recomputes each block's forward once more in the backward;
  `remat=dots` saves matmul outputs without batch dimensions (the dense layers) but recomputes the
  attention einsums, whose operands carry batch dimensions.
- Distillation (cfmjax/objectives/distill.py; counted by objectives.FlowMap / FixedPoint): the batch is split into `round(B·diag_fraction)` diagonal rows
  (a base-flow step on them) and consistency rows, on which the student runs forward + backward and
  the teacher, never differentiated, runs:
    PSD: two forwards (ψ(x, s, u) and ψ(X_{s,u}(x), u, t));
    LSD: one JVP in t of the forward at (s, t) + one forward on the diagonal at the landing point;
    ESD: one forward on the diagonal at (s, s) + one JVP in (x, s) of the forward at (s, t).
  A JVP runs the primal forward plus a tangent pass: each matmul whose input carries a tangent runs
  once more (weights have no tangent), and each attention product twice (both operands do). The
  tangent in t starts in the time MLP; the state's first projection has no tangent there (x is
  fixed). So a JVP costs about 2× a forward (2-3× counting attention at long sequence lengths).
- The autoregressive baseline (objective = "ar") takes token ids: its input is a row gather of
  the embedding whenever the state path would be the embedding one, else the one-hot V × D matmul.

Every function returns FLOPs as Python floats (model sizes overflow int32 and need no exactness).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform

from cfmjax.models import state_space as state_space_lib

# Terms of one network forward, keyed by name; each is MACs for `rows` examples of `seq_len` positions.
PER_POSITION_TERMS = ("input", "posterior_input", "posterior_evidence", "local_mix", "qkv", "attn_scores", "attn_values", "attn_out",
                      "mlp", "head", "skip")
PER_EXAMPLE_TERMS = ("time_in", "time_out", "adaln", "final_adaln")


@dataclasses.dataclass(frozen=True)
class Dims:
  """The sizes FLOPs depend on, read from a config (so callers need not build a model)."""

  vocab: int
  d_model: int
  num_layers: int
  mlp_dim: int
  time_features: int
  seq_len: int
  embedding_state: bool  # True: the state is h = xW (D-dim); False: the V-dim state
  causal: bool
  fused_attention: bool  # cuDNN: a causal mask skips the masked blocks
  remat: str
  skip: bool = False  # model.skip: in embedding space a second head-sized product (SPEC §9)
  posterior_input: bool = False  # model.posterior_input: up to two more head-sized products
  local_mix: int = 0  # model.local_mix: a depthwise convolution of 2r + 1 taps per block


def _get(node, key, default):
  try:
    return node[key] if key in node else default
  except TypeError:
    return getattr(node, key, default)


def dims_from_config(config, *, vocab: int, seq_len: int | None = None) -> Dims:
  """Dims of an experiment config with the data's vocabulary `vocab` (Experiment.vocab_size)."""
  m = config.model
  vocab = int(vocab)
  if vocab <= 0:
    raise ValueError(f"vocab={vocab}: pass the data's vocabulary size (Experiment.vocab_size)")
  seq_len = int(seq_len if seq_len is not None else config.data.seq_len)
  state_space = state_space_lib.resolve(_get(m, "state_space", "vocab"), vocab, int(m.d_model))
  causal = config.objective == "ar"
  return Dims(vocab=vocab, d_model=int(m.d_model), num_layers=int(m.num_layers), mlp_dim=int(m.mlp_dim),
              time_features=int(m.time_features), seq_len=seq_len,
              embedding_state=state_space == "embedding", causal=causal,
              fused_attention=_get(m, "attention", "xla") == "cudnn", remat=_get(m, "remat", "none"),
              skip=bool(_get(m, "skip", False)) and not causal,
              posterior_input=bool(_get(m, "posterior_input", False)) and not causal,
              local_mix=int(_get(m, "local_mix", 0)))


def forward_macs(d: Dims, rows: int) -> dict[str, float]:
  """MACs of one network forward on `rows` sequences, per term (see PER_*_TERMS)."""
  n, L, V, D, F, N = rows, d.seq_len, d.vocab, d.d_model, d.mlp_dim, d.num_layers
  positions = float(n * L)
  # Attention products: per example L×L×D for QKᵀ (summed over heads: N_h·L·L·(D/N_h)) and for AV.
  pairs = L * (L + 1) / 2 if (d.causal and d.fused_attention) else float(L * L)
  return {
      # The embedding path's network input is h itself: no matmul (the noise draw is counted apart).
      "input": 0.0 if d.embedding_state else positions * V * D,
      # model.posterior_input: softmax(evidence) · E (V × D), and the evidence's own [D + 1] × V
      # product in the skip term's embedding form (the V-space form is elementwise).
      "posterior_input": positions * V * D if d.posterior_input else 0.0,
      "posterior_evidence": (positions * (D + 1) * V
                             if d.posterior_input and vocab_form_is_embedding(d) else 0.0),
      "local_mix": N * positions * (2 * d.local_mix + 1) * D if d.local_mix else 0.0,
      "time_in": float(n) * 2 * d.time_features * D,
      "time_out": float(n) * D * D,
      "adaln": float(N) * n * D * 6 * D,
      "qkv": N * positions * D * 3 * D,
      "attn_scores": float(N) * n * pairs * D,
      "attn_values": float(N) * n * pairs * D,
      "attn_out": N * positions * D * D,
      "mlp": N * positions * 2 * D * F,
      "final_adaln": float(n) * D * 2 * D,
      "head": positions * D * V,
      # The skip term's embedding form (model.skip_terms): Σ⁻¹h by two triangular solves (D² per
      # position) and the [D + 1] × V product fused with the head; the V-space form is elementwise.
      "skip": positions * (D * D + (D + 1) * V) if (d.skip and vocab_form_is_embedding(d)) else 0.0,
  }


def vocab_form_is_embedding(d: Dims) -> bool:
  """Mirrors model.skip_embedding_form: the skip term is computed from h = xW when V > D."""
  return d.vocab > d.d_model


# How many times each term runs in forward + backward (see the module docstring).
_TRAIN_MULTIPLIER = {k: 3.0 for k in PER_POSITION_TERMS + PER_EXAMPLE_TERMS}
# No gradient into what only the state and time feed: the input projection and time features take
# forward + weight gradient, the posterior table too (its softmax reads the state alone), and the
# evidence product (state features against the stop-gradient embedding) runs once.
_TRAIN_MULTIPLIER.update(input=2.0, time_in=2.0, posterior_input=2.0, posterior_evidence=1.0)
# Extra runs of each term in a JVP's tangent pass, by which input carries the tangent.
_ALL_ONE = {k: 1.0 for k in PER_POSITION_TERMS + PER_EXAMPLE_TERMS}
_JVP_TANGENT = {
    "t": dict(_ALL_ONE, input=0.0, posterior_input=0.0, posterior_evidence=0.0, attn_scores=2.0,
              attn_values=2.0),
    "xs": dict(_ALL_ONE, attn_scores=2.0, attn_values=2.0),
}
_BLOCK_TERMS = ("adaln", "qkv", "attn_scores", "attn_values", "attn_out", "mlp")


def _total(macs: dict, multipliers: dict | None = None) -> float:
  return sum(v * (1.0 if multipliers is None else multipliers[k]) for k, v in macs.items())


def noise_draw_macs(d: Dims, rows: int) -> float:
  """MACs of drawing the noisy state for `rows` sequences: only the embedding path has a matmul."""
  return float(rows * d.seq_len) * d.d_model ** 2 if d.embedding_state else 0.0


def state_map_macs(d: Dims, rows: int) -> float:
  """MACs of one ψW (a distribution over the vocabulary mapped to the state), embedding path only."""
  return float(rows * d.seq_len) * d.vocab * d.d_model if d.embedding_state else 0.0


def noise_factor_flops(d: Dims, trained: bool) -> float:
  """FLOPs of WᵀW and its Cholesky factor (once per step, embedding path); ×3 when differentiated."""
  if not d.embedding_state:
    return 0.0
  flops = 2.0 * d.vocab * d.d_model ** 2 + d.d_model ** 3 / 3.0
  return 3.0 * flops if trained else flops


def _remat_macs(d: Dims, rows: int) -> float:
  """MACs recomputed in the backward by rematerialisation (hardware FLOPs only)."""
  macs = forward_macs(d, rows)
  if d.remat == "full":
    return sum(macs[k] for k in _BLOCK_TERMS)
  if d.remat == "dots":
    return macs["attn_scores"] + macs["attn_values"]
  return 0.0


def forward_flops(d: Dims, rows: int) -> float:
  """FLOPs of one network forward on `rows` sequences."""
  return 2.0 * _total(forward_macs(d, rows))


def train_macs(d: Dims, rows: int, hardware: bool = False, noise: bool = True) -> float:
  """MACs of one forward + backward on `rows` sequences, the noise draw included when `noise`."""
  macs = _total(forward_macs(d, rows), _TRAIN_MULTIPLIER)
  if noise:
    macs += 2.0 * noise_draw_macs(d, rows)  # z Lᵀ and the gradient into L
  if hardware:
    macs += _remat_macs(d, rows)
  return macs


def jvp_macs(d: Dims, rows: int, tangent_in: str) -> float:
  """MACs of jax.jvp of the forward: primal + tangent pass (`tangent_in` = 't' or 'xs')."""
  macs = forward_macs(d, rows)
  return _total(macs) + _total(macs, _JVP_TANGENT[tangent_in])


def generation_flops(config, sampler: str, steps: int, num_samples: int, *, vocab: int,
                     seq_len: int | None = None) -> float:
  """FLOPs to generate `num_samples` sequences.

  euler / flowmap: `steps` full forwards (plus ψW per step in embedding space, and the noise draw).
  ar: KV-cached decoding of seq_len tokens, one position per step; attention over the cache is
  counted over the whole preallocated cache length (what a fixed-shape XLA decode loop executes).
  """
  d = dims_from_config(config, seq_len=seq_len, vocab=vocab)
  if sampler in ("euler", "flowmap"):
    per_step = _total(forward_macs(d, num_samples)) + state_map_macs(d, num_samples)
    return 2.0 * (steps * per_step + noise_draw_macs(d, num_samples)) + noise_factor_flops(d, False)
  if sampler == "ar":
    one = dataclasses.replace(d, seq_len=1)
    macs = forward_macs(one, num_samples)
    # Each new position attends to all L cache slots: L·D per head-summed product, not 1·D.
    macs["attn_scores"] = macs["attn_values"] = float(d.num_layers) * num_samples * d.seq_len * d.d_model
    return 2.0 * d.seq_len * _total(macs)
  raise ValueError(f"unknown sampler {sampler!r}; choose euler, flowmap or ar")


# ----------------------------------------------------------------------------------------------
# Peak FLOP/s of the device, for MFU.

# Peak dense bf16 matmul FLOP/s per JAX device (one chip: v4 and v5p run their two TensorCores as
# one "megacore" device). Sources:
#   TPU v4 275 TFLOP/s: https://cloud.google.com/tpu/docs/v4 ("Peak compute per chip 275 teraflops (bf16)")
#   TPU v5e 197 TFLOP/s: https://docs.cloud.google.com/tpu/docs/v5e ("Peak compute per chip (bf16)")
#   TPU v5p 459 TFLOP/s: https://cloud.google.com/tpu/docs/v5p-training ("Peak compute per chip (bf16)")
#   TPU v6e 918 TFLOP/s: https://docs.cloud.google.com/tpu/docs/v6e ("Peak compute per chip (bf16)")
#   H100 SXM 989.4 TFLOP/s dense (1979 is with 2:4 sparsity): https://glennklockwood.com/garden/processors/h100
#   H200: the same GH100 compute with more and faster HBM (same source): 989.4 TFLOP/s dense.
# Matched in order against jax.devices()[0].device_kind, lower-cased ("TPU v5 lite" is v5e, plain
# "TPU v5" is v5p, "TPU v6 lite" is v6e; H100 PCIe/NVL differ and are not listed).
PEAK_BF16_FLOPS = (
    (("tpu v5 lite", "tpu v5e"), 197e12),
    (("tpu v5p", "tpu v5"), 459e12),
    (("tpu v6 lite", "tpu v6e"), 918e12),
    (("tpu v4",), 275e12),
    (("h200",), 989.4e12),
    (("h100 80gb hbm3", "h100 sxm"), 989.4e12),
)


def table_peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind from the table, or None if it is not listed."""
  kind = device_kind.lower()
  for names, peak in PEAK_BF16_FLOPS:
    if any(name in kind for name in names):
      return peak
  return None


# On CPU, MFU is measured against a peak that bench/cpu_matmul_peak.py measured on THIS machine (best
# of several runs, with the load average at the time), cached per machine and never committed: a
# peak from another box of the same CPU model, or from a busy one, gave MFUs above 1.


def machine_id() -> str:
  """A short id of this machine: /etc/machine-id (or the host name), the CPU model and core count."""
  try:
    with open("/etc/machine-id") as f:
      host = f.read().strip()
  except OSError:
    host = platform.node()
  return hashlib.sha256(f"{host}|{cpu_model()}|{os.cpu_count()}".encode()).hexdigest()[:16]


def cpu_peak_path() -> str:
  """Where this machine's measured CPU peak is cached: $CFMJAX_CACHE (or ~/.cache/cfmjax)/cpu_peak/<id>.json."""
  cache = os.path.expanduser(os.environ.get("CFMJAX_CACHE", "~/.cache/cfmjax"))
  return os.path.join(cache, "cpu_peak", f"{machine_id()}.json")


def measured_cpu_peak(path: str | None = None) -> dict | None:
  """This machine's record from bench/cpu_matmul_peak.py: {"peak_flops": {dtype: FLOP/s for the whole
  process}, "measured_at", ...}, or None (never measured here, or the file is another machine's)."""
  path = path or cpu_peak_path()
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  if saved.get("machine_id") != machine_id():
    return None
  return saved


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo; the platform string elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


@dataclasses.dataclass(frozen=True)
class Peak:
  """Peak FLOP/s of ONE device (None: unknown, so MFU is null) and where the number comes from."""
  flops: float | None
  source: str


def device_peak(device, dtype: str = "bfloat16", num_devices: int = 1, cpu_peak_file: str | None = None) -> Peak:
  """The table for TPUs/GPUs; on CPU this machine's measured matmul peak, divided among the
  `num_devices` (fake) CPU devices that share its cores."""
  if device.platform == "cpu":
    saved = measured_cpu_peak(cpu_peak_file)
    if saved is None or dtype not in saved["peak_flops"]:
      return Peak(None, "none: no CPU peak measured on this machine (python bench/cpu_matmul_peak.py)")
    return Peak(float(saved["peak_flops"][dtype]) / num_devices,
                f"cpu {dtype} measured here {saved.get('measured_at', '?')}")
  peak = table_peak_flops(device.device_kind)
  return Peak(peak, f"table {device.device_kind} bf16" if peak else f"none: {device.device_kind} not in flops.py's table")


_PEAKS_WARNED_ABOUT: set = set()


def throughput(flops_per_step: float, steps_per_sec: float, num_devices: int, peak_per_device) -> dict:
  """Model TFLOP/s per device and MFU (None when the device's peak is unknown, or when the achieved
  rate exceeds it: that says the peak is wrong, e.g. a CPU peak measured while the cores were busy,
  and no MFU is better than one above 1)."""
  per_device = flops_per_step * steps_per_sec / num_devices
  mfu = per_device / peak_per_device if peak_per_device else None
  if mfu is not None and mfu > 1.0:
    if peak_per_device not in _PEAKS_WARNED_ABOUT:  # once per peak, not at every logged step
      _PEAKS_WARNED_ABOUT.add(peak_per_device)
      logging.getLogger(__name__).warning(
          "achieved %.3g FLOP/s per device exceeds the peak %.3g: MFU not reported; on CPU re-measure "
          "the peak on an idle machine with bench/cpu_matmul_peak.py", per_device, peak_per_device)
    mfu = None
  return {"model_tflops_per_sec_per_device": per_device / 1e12, "mfu": mfu}
