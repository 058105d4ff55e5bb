"""The network: a bidirectional DiT-style transformer over per-position vocabulary vectors.

    logits = f_θ(x, τ_s, τ_t)      x: [B, L, V] state, τ_s, τ_t: [B] model times → [B, L, V] logits

The flow map ψ(x, s, t) = softmax(f_θ(x, τ_s, τ_t)) and the denoiser μ(x, t) = ψ(x, t, t) share
this one network (SPEC §3): the base flow is trained with s = t from day one.

Architecture: linear input projection of the state (no bias, so that it commutes with the affine
updates of the samplers, SPEC §4), plus (model.posterior_input) each position's context-free
posterior read through an embedding table, computed from h = xW so that it commutes too; rotary positions, adaLN-zero conditioning on sinusoidal features
of both times, pre-LN blocks (optionally under `nn.scan`, one compiled layer for any depth), and an
untied output head. Parameters and activations carry logical axis names; `sharding.py` maps them to
mesh axes with the rules in the config.

The module is used only through `apply`: callers see a plain function of (params, inputs), which is
what `jax.jit`, `jax.grad` and `jax.jvp` want.

Entry points (SPEC §4, where the state may live in embedding space):

    apply_fn(params, x, τ_s, τ_t)                  x: [B, L, V] state → logits [B, L, V] (the reference)
    apply_fn(params, h, τ_s, τ_t, embedded=True)   h = xW: [B, L, D] state, already projected
    apply_fn(..., hidden=True)                     the final normalised hidden state [B, L, D] instead
                                                   of logits, for losses fused with the head per
                                                   vocabulary chunk (`state_space.vocab_stats`);
                                                   with model.skip, (hidden, skip) where `skip`
                                                   is `skip_terms`' (features, kernel)
    embedding_matrix(params) → W [V, D]            to embed V-dim states / probabilities (ψW)
    head_params(params) → (kernel [D, V], bias [V])

Both input paths share every parameter; `embedded=True` only skips the first layer, whose matmul
(no bias) commutes with the samplers' affine updates. `state_space.py` decides which path runs.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfmjax.flow import prompting, schedules

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  time_features: int = 256  # width of each time's sinusoidal embedding
  # τ is multiplied by this before the sinusoidal features. Diffusion models use 1000; the flow map's
  # LSD/ESD losses differentiate the network in time (jax.jvp), and high-frequency time features make
  # those derivatives large and the clamped teachers useless, so the default is much lower.
  time_scale: float = 10.0
  dtype: str = "float32"  # activations; parameters are always kept in float32
  attention: str = "xla"  # 'xla' (differentiable in both modes) | 'cudnn' (fused, reverse-mode only)
  scan_layers: bool = True
  remat: str = "none"  # 'none' | 'full' | 'dots' (save matmul outputs only)
  causal: bool = False  # True only for the autoregressive baseline
  # Self-conditioning (SPEC §8): the previous estimate μ̂ [B, L, V] enters through its own
  # zero-initialised projection (V → D, no bias) added to the state's projection.
  self_condition: bool = False
  # Prefix conditioning (SPEC §8): a learned vector is added at prompt positions, so the network
  # knows which positions hold a clean prompt (see prompting.py).
  prompt_flag: bool = False
  # Skip parametrisation (SPEC §9): the logits include the exact context-free posterior's evidence
  # term, so the network learns only the correction from context (the prior sits in the head bias).
  # It needs γ from τ, hence the flow's schedule name.
  skip: bool = False
  schedule: str = "linear"
  # The residual gates of each block are gate_init + (a zero-initialised function of time). DiT's
  # adaLN-zero is gate_init = 0: every block starts switched off. Together with a zero-initialised
  # head (model.skip) that is a saddle: the head gets no signal from the blocks and the gates none
  # from the head, so whatever needs the blocks' nonlinear features (a source whose single
  # neighbours say nothing) is never learned. gate_init > 0 starts the blocks on.
  gate_init: float = 0.0
  # With the skip term the head starts at zero (an untrained model is the context-free posterior).
  # That is the other half of the saddle above: the blocks get no gradient through a zero head, and
  # the head none from features that carry no pairwise signal. > 0: the head starts random at this
  # multiple of LeCun's scale, so the blocks learn from step 0 (the skip term still carries the
  # context-free posterior).
  head_init_scale: float = 0.0
  # Local mixing: each block first adds a depthwise convolution over positions l−r..l+r (l−r..l when
  # causal) to its residual stream, randomly initialised so that it is on from step 0. Attention
  # starts uniform over all L positions, so a neighbour's features arrive diluted by 1/L and a
  # dependency that only shows jointly in two neighbours (no pairwise signal) gives the attention no
  # gradient to focus with; the convolution hands the MLP its neighbours at full weight. 0: off.
  local_mix: int = 0
  # Posterior input: each position also reads its own context-free posterior (flat prior, SPEC §9)
  # through an embedding table E (rows of norm ~√D), as softmax(evidence) · E. The raw state's noise
  # has norm ~√V(1 − γ) against a signal of γ, so a neighbour seen through xW is mostly noise long
  # after it is identifiable on its own; its posterior says the same without the noise. Measured in
  # results/recipe_ablation.md (it helps where context is learned at all; it cannot teach what the
  # loss gives no gradient for).
  posterior_input: bool = False
  vocab_chunk: int = 0  # > 0: the posterior input is reduced per chunk of this many tokens

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by model.num_heads={self.num_heads}")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError("rotary positions need an even head dimension (d_model / num_heads)")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"unknown model.attention={self.attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown model.remat={self.remat!r}; choose one of {REMAT_POLICIES}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def model_config_from(config, vocab_size: int) -> ModelConfig:
  """The typed, frozen view of an experiment config's `model` section, with the values that are not
  config keys: the data's vocabulary and the prompt flag (flow.prompt: prompt-trained models add a
  learned vector at prompt positions)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kwargs = {k: v for k, v in config.model.items() if k in fields}
  kwargs["vocab_size"] = int(vocab_size)
  kwargs["prompt_flag"] = prompting.enabled(config)
  kwargs["schedule"] = config.flow.schedule  # the skip term is written in γ = g(τ)
  kwargs["causal"] = config.objective == "ar"  # the autoregressive baseline's causal trunk (ar.py)
  return ModelConfig(**kwargs)


# γ is capped below 1 in the skip term: its coefficient γ/(1 − γ)² is 10⁶ at the cap, which float32
# logits carry without trouble, and past it nothing a sampler or the bound visits is cut off.
SKIP_GAMMA_MAX = 0.999


def skip_coefficients(config: ModelConfig, tau):
  """(γ/(1 − γ)², γ²/(2(1 − γ)²)) per row [B], float32: the evidence and leverage factors of §9."""
  gamma = schedules.get_schedule(config.schedule, config.vocab_size).gamma(tau.astype(jnp.float32))
  gamma = jnp.clip(gamma, 0.0, SKIP_GAMMA_MAX)
  inv = 1.0 / jnp.square(1.0 - gamma)
  return gamma * inv, 0.5 * jnp.square(gamma) * inv


def skip_embedding_form(config: ModelConfig) -> bool:
  """The skip term is computed from h = xW when V > D (the state may live in embedding space and
  the V-vector is not recoverable from h), and from x itself otherwise; both entry points of the
  model use the same form, so the V-space and embedded calls still agree exactly (SPEC §4)."""
  return config.vocab_size > config.d_model


def whitened_embedding(w):
  """(C, leverage [V]) with C Cᵀ = WᵀW (float32 Cholesky, tiny jitter) and leverage_k = W_k Σ⁻¹ W_kᵀ:
  what the embedding-space context-free posterior needs (SPEC §9). No gradient flows into W here:
  the skip term is a fixed function of the current embedding, not something to optimise W through."""
  w = jax.lax.stop_gradient(w).astype(jnp.float32)
  d = w.shape[1]
  gram = jnp.matmul(w.T, w, precision=jax.lax.Precision.HIGHEST)
  gram = gram + 1e-6 * jnp.trace(gram) / d * jnp.eye(d, dtype=jnp.float32)
  chol = jnp.linalg.cholesky(gram)
  w_hat = jax.scipy.linalg.solve_triangular(chol, w.T, lower=True)  # C⁻¹Wᵀ = Ŵᵀ, [D, V]
  return chol, jnp.sum(jnp.square(w_hat), axis=0)


def skip_terms(config: ModelConfig, w, x, h, tau_s):
  """The context-free evidence as (features [B, L, F], kernel [F, V]) with skip logits = features ·
  kernel, in float32, or (x-term [B, L, V], None) in the V-space form (logits = c(γ) x directly).

  Embedding form (SPEC §9): (γ Ŵ_k·ĥ − γ² ‖Ŵ_k‖²/2)/(1 − γ)² = c₁ (W Σ⁻¹ hᵀ)_k − c₂ leverage_k,
  written as features [c₁ Σ⁻¹h, −c₂] against the kernel [Wᵀ; leverage], so that it fuses with the
  output head per vocabulary chunk (state_space.vocab_stats).
  """
  c1, c2 = skip_coefficients(config, tau_s)
  if c1.ndim == 1:  # one time per row [B], or one per position [B, L] (flow.position_noise)
    c1, c2 = c1[:, None], c2[:, None]
  if not skip_embedding_form(config):
    if x is None:  # h = xW with W of full row rank V ≤ D: x = h Wᵀ(WWᵀ)⁻¹ exactly
      w32 = jax.lax.stop_gradient(w).astype(jnp.float32)
      gram = jnp.matmul(w32, w32.T, precision=jax.lax.Precision.HIGHEST)
      x = jnp.linalg.solve(gram, jnp.matmul(h.astype(jnp.float32), w32.T,
                                             precision=jax.lax.Precision.HIGHEST).reshape(-1, w.shape[0]).T)
      x = x.T.reshape(h.shape[:-1] + (w.shape[0],))
    return c1[..., None] * x.astype(jnp.float32), None
  chol, leverage = whitened_embedding(w)
  h32 = h.astype(jnp.float32)
  flat = h32.reshape(-1, h32.shape[-1]).T
  u = jax.scipy.linalg.cho_solve((chol, True), flat).T.reshape(h32.shape)  # Σ⁻¹h per position
  features = jnp.concatenate([c1[..., None] * u,
                              jnp.broadcast_to(-c2[..., None], h32.shape[:-1] + (1,))], axis=-1)
  kernel = jnp.concatenate([jax.lax.stop_gradient(w).astype(jnp.float32).T, leverage[None, :]], axis=0)
  return features, kernel


def add_skip(logits, skip):
  """logits + the skip term of `skip_terms` (float32)."""
  features, kernel = skip
  if kernel is None:
    return logits + features
  return logits + jnp.matmul(features, kernel, precision=jax.lax.Precision.HIGHEST)


def posterior_embedding(skip, table, chunk: int):
  """softmax(e) · table [B, L, D] for the evidence logits e = `add_skip(0, skip)` (the context-free
  posterior under a flat prior, SPEC §9), in float32. In the embedding form with 0 < chunk < V it
  runs over vocabulary chunks with an online softmax (as `state_space.vocab_stats` does), never
  holding the [B, L, V] evidence; the V-space form holds it anyway (V ≤ D there)."""
  features, kernel = skip
  vocab = table.shape[0]
  table = table.astype(jnp.float32)
  if kernel is None or chunk <= 0 or chunk >= vocab:
    return jnp.matmul(jax.nn.softmax(add_skip(0.0, skip), axis=-1), table)
  num_chunks = -(-vocab // chunk)
  pad = num_chunks * chunk - vocab
  kernel, table = jnp.pad(kernel, ((0, 0), (0, pad))), jnp.pad(table, ((0, pad), (0, 0)))

  @jax.checkpoint
  def step(carry, index):
    m, s, acc = carry
    offset = index * chunk
    z = jnp.matmul(features, jax.lax.dynamic_slice_in_dim(kernel, offset, chunk, axis=1),
                   precision=jax.lax.Precision.HIGHEST)
    z = jnp.where(offset + jnp.arange(chunk) < vocab, z, -jnp.inf)
    m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(z, axis=-1)))
    rescale, e = jnp.exp(m - m_new), jnp.exp(z - m_new[..., None])
    acc = acc * rescale[..., None] + jnp.matmul(e, jax.lax.dynamic_slice_in_dim(table, offset, chunk, axis=0))
    return (m_new, s * rescale + jnp.sum(e, axis=-1), acc), None

  batch_shape = features.shape[:-1]
  init = (jnp.full(batch_shape, -jnp.inf, jnp.float32), jnp.zeros(batch_shape, jnp.float32),
          jnp.zeros(batch_shape + (table.shape[1],), jnp.float32))
  (_, s, acc), _ = jax.lax.scan(step, init, jnp.arange(num_chunks))
  return acc / s[..., None]


class Projection(nn.Module):
  """x · kernel over the last `contract` axes of x and the first `contract` axes of the kernel,
  with no bias: the attention projections, whose kernels keep their head axes.

  nn.DenseGeneral initialises such a kernel flat and reshapes it, and flax re-runs that
  initialiser abstractly on every apply to check shapes: under the logical-axis rules
  (sharding.activate) the flat kernel then meets its rank-4 axis names and is refused. Here the
  kernel is drawn in its own shape, with DenseGeneral's fan-in (the contracted axes).
  """

  shape: tuple
  names: tuple
  contract: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    axes = tuple(range(len(self.shape)))
    init = nn.initializers.lecun_normal(in_axis=axes[:self.contract], out_axis=axes[self.contract:])
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names), self.shape, jnp.float32)
    dims = (tuple(range(x.ndim - self.contract, x.ndim)), axes[:self.contract])
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (dims, ((), ())))


def _dense(features, names, name, zero=False, use_bias=True, dtype=jnp.float32, scale=1.0):
  # LeCun's init (scale 1) or its kernel at `scale` times the standard deviation
  init = nn.initializers.zeros_init() if zero else nn.initializers.variance_scaling(
      scale ** 2, "fan_in", "truncated_normal")
  return nn.Dense(features, name=name, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.with_logical_partitioning(init, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]))


def sinusoidal_features(tau, dim: int, scale: float = 1000.0, max_period: float = 10_000.0):
  """Sinusoidal features of τ ∈ [0, 1] scaled by `scale`, [B] → [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = scale * tau.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def rotary_tables(length: int, head_dim: int):
  """cos/sin tables [L, head_dim/2] for rotary positions."""
  half = head_dim // 2
  inv_freq = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
  """Rotates pairs (x_i, x_{i+half}) of x [B, L, N, H] by position-dependent angles."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _layer_norm(x, eps: float = 1e-6):
  # adaLN supplies the scale and shift, so the norm itself has no parameters (as in DiT).
  # Statistics in float32 whatever the activation dtype.
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def local_mix(module: nn.Module, x, radius: int, causal: bool):
  """Σ_o w_o ⊙ x_{l+o} over offsets o ∈ [−radius, radius] ([−radius, 0] when causal), zero past the
  ends: a depthwise convolution, written as shifts so that the length axis keeps its sharding."""
  offsets = range(-radius, 1 if causal else radius + 1)
  kernel = module.param("local_mix", nn.with_logical_partitioning(
      nn.initializers.normal(1.0 / len(offsets) ** 0.5), (None, "embed")),
      (len(offsets), x.shape[-1]), jnp.float32).astype(x.dtype)
  length = x.shape[1]
  out = jnp.zeros_like(x)
  for i, o in enumerate(offsets):  # out_l += w_o x_{l+o}
    shifted = jnp.pad(x, ((0, 0), (max(-o, 0), max(o, 0)), (0, 0)))[:, max(o, 0):max(o, 0) + length]
    out = out + kernel[i] * shifted
  return out


class Block(nn.Module):
  """Pre-LN transformer block with adaLN-zero: every residual branch starts switched off.

  With `cache` = (keys, values) [B, L_cache, N, H] and `position`, the block runs KV-cached decoding
  (ar.decode): x holds the one position `position`, whose keys and values are written into the cache,
  and it attends to the positions up to it. Returns x, or (x, cache) when decoding.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x, cond, rope, cache=None, position=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    mod = _dense(6 * cfg.d_model, ("embed", "modulation"), "adaln", zero=True, dtype=dtype)(nn.silu(cond))
    # The modulation's features are never sharded (the "modulation" rule of sharding.DEFAULT_RULES)
    # before it is split six ways: a split of a tensor-sharded axis, and the concatenation of the
    # six gradients in the backward pass, forced XLA into full rematerialisations, which also gave
    # wrong gradients at one row per shard (tests/test_aot.py, tests/test_training.py).
    mod = nn.with_logical_constraint(mod, ("batch", "modulation"))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod[:, None, :], 6, axis=-1)
    gate1, gate2 = gate1 + cfg.gate_init, gate2 + cfg.gate_init
    if cfg.local_mix:
      if cache is not None:
        raise ValueError("model.local_mix reads neighbours on both sides: it has no one-position decoding")
      x = x + local_mix(self, x, cfg.local_mix, cfg.causal)

    h = _layer_norm(x) * (1.0 + scale1) + shift1
    qkv = Projection((cfg.d_model, 3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "kv"),
                     contract=1, dtype=dtype, name="qkv")(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    if cache is None:
      attn = jax.nn.dot_product_attention(q, k, v, is_causal=cfg.causal, implementation=cfg.attention)
    else:  # one position: write its keys and values, attend to the cache up to it
      keys, values = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), position, axis=1)
                      for c, new in zip(cache, (k, v)))
      visible = (jnp.arange(keys.shape[1]) <= position)[None, None, None, :]
      attn = jax.nn.dot_product_attention(q, keys, values, mask=visible, implementation="xla")
      cache = (keys, values)
    attn = Projection((cfg.num_heads, cfg.head_dim, cfg.d_model), ("heads", "kv", "embed"),
                      contract=2, dtype=dtype, name="attn_out")(attn)
    x = x + gate1 * attn

    h = _layer_norm(x) * (1.0 + scale2) + shift2
    h = _dense(cfg.mlp_dim, ("embed", "mlp"), "mlp_in", dtype=dtype)(h)
    h = nn.gelu(h)
    h = _dense(cfg.d_model, ("mlp", "embed"), "mlp_out", dtype=dtype)(h)
    x = nn.with_logical_constraint(x + gate2 * h, ("batch", "length", "embed"))
    return x if cache is None else (x, cache)


class ScannedBlock(Block):
  """The same block with the (carry, per-step output) signature that `nn.scan` expects: the carry is
  x, the per-layer input and output the layer's KV cache (None outside decoding)."""

  @nn.compact
  def __call__(self, x, cond, rope, cache=None, position=None):
    out = Block.__call__(self, x, cond, rope, cache, position)
    return out if cache is not None else (out, None)


def _remat(block_cls, policy: str, scanned: bool):
  if policy == "none":
    return block_cls
  checkpoint_policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                       if policy == "dots" else None)
  return nn.remat(block_cls, policy=checkpoint_policy, prevent_cse=not scanned)


def layer_stack(cfg: ModelConfig):
  """The blocks of the flow and of the AR model, called from a module's setup: one `nn.scan` over
  layers (model.scan_layers; parameters stacked on a leading "layers" axis), or a list of blocks."""
  if cfg.scan_layers:
    block = _remat(ScannedBlock, cfg.remat, scanned=True)
    # scanned over layers: the per-layer KV cache; broadcast: cond, rope and the decoded position
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="blocks")
  block = _remat(Block, cfg.remat, scanned=False)
  return [block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]


def trunk(blocks, final_adaln, scanned: bool, h, cond, rope, cache=None, position=None):
  """The block stack and the final adaLN-modulated norm, shared by the flow and the AR model:
  hidden states [B, L, D] -> the normalised input of the output head. With a KV cache (keys, values
  [layers, B, L, N, H]) it decodes the one position `position` and returns (output, cache)."""
  # The conditioning vector stays whole along its features (like the modulations it feeds): its
  # gradient then arrives from every adaLN layer in one layout (no involuntary rematerialisation).
  cond = nn.with_logical_constraint(cond, ("batch", "modulation"))
  if scanned:
    h, cache = blocks(h, cond, rope, cache, position)
  elif cache is None:
    for block in blocks:
      h = block(h, cond, rope)
  else:
    per_layer = []
    for i, block in enumerate(blocks):
      h, layer_cache = block(h, cond, rope, (cache[0][i], cache[1][i]), position)
      per_layer.append(layer_cache)
    cache = tuple(jnp.stack(parts) for parts in zip(*per_layer))
  final_mod = nn.with_logical_constraint(final_adaln(nn.silu(cond)), ("batch", "modulation"))
  shift, scale = jnp.split(final_mod[:, None, :], 2, axis=-1)
  out = _layer_norm(h) * (1.0 + scale) + shift
  return out if cache is None else (out, cache)


class FlowTransformer(nn.Module):
  """f_θ(x, τ_s, τ_t) → logits. See the module docstring."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    # The state's projection W (V × D): the only place the V-dimensional input is touched.
    self.embed = _dense(cfg.d_model, ("vocab", "embed"), "embed", use_bias=False, dtype=dtype)
    if cfg.self_condition:  # zero-initialised: training starts from the plain network
      self.self_cond_embed = _dense(cfg.d_model, ("vocab", "embed"), "self_cond_embed", zero=True,
                                    use_bias=False, dtype=dtype)
    if cfg.prompt_flag:
      self.prompt_embed = self.param("prompt_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (cfg.d_model,), jnp.float32)
    if cfg.posterior_input:  # rows of norm ~√D, like a token embedding table (ar.py)
      self.posterior_table = self.param("posterior_embed", nn.with_logical_partitioning(
          nn.initializers.normal(1.0), ("vocab", "embed")), (cfg.vocab_size, cfg.d_model), jnp.float32)
    self.time_in = _dense(cfg.d_model, ("mlp", "embed"), "time_in", dtype=jnp.float32)
    self.time_out = _dense(cfg.d_model, ("embed", "modulation"), "time_out", dtype=jnp.float32)
    self.blocks = layer_stack(cfg)
    self.final_adaln = _dense(2 * cfg.d_model, ("embed", "modulation"), "final_adaln", zero=True, dtype=dtype)
    # With the skip term the head starts at zero, so an untrained model is the context-free
    # posterior once its bias holds the log unigram frequencies (experiment.init_state).
    scaled = cfg.skip and cfg.head_init_scale > 0  # model.head_init_scale: a random head under the skip term
    self.head = _dense(cfg.vocab_size, ("embed", "vocab"), "head", zero=cfg.skip and not scaled, dtype=dtype,
                       scale=cfg.head_init_scale if scaled else 1.0)

  def conditioning(self, tau_s, tau_t):
    """Both times → one conditioning vector [B, D]."""
    cfg = self.config
    feats = jnp.concatenate([sinusoidal_features(tau_s, cfg.time_features, cfg.time_scale),
                             sinusoidal_features(tau_t, cfg.time_features, cfg.time_scale)], axis=-1)
    return self.time_out(nn.silu(self.time_in(feats)))

  def __call__(self, x, tau_s, tau_t, embedded: bool = False, hidden: bool = False, self_cond=None,
               prompt_mask=None, position_tau=None):
    """`self_cond`: the previous estimate μ̂ [B, L, V] (None reads as μ̂ = 0); `prompt_mask`: bool
    [B, L], True at clean prompt positions (None: no prompt). Each needs its config switch.
    `position_tau` [B, L]: each position's own noise level (flow.position_noise), which the
    context-free evidence of the skip term and the posterior input is computed at; None: τ_s."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    # embedded: x is already the projected state h = xW (SPEC §4), so the first layer is skipped.
    h = x.astype(dtype) if embedded else self.embed(x.astype(dtype))
    skip = None
    if cfg.skip or cfg.posterior_input:  # from the state as it came in, before flags or self-conditioning
      w = nn.meta.unbox(self.embed.variables["params"]["kernel"])
      evidence = skip_terms(cfg, w, None if embedded else x, h, tau_s if position_tau is None else position_tau)
      if cfg.posterior_input:
        h = h + posterior_embedding(evidence, self.posterior_table, cfg.vocab_chunk).astype(dtype)
      skip = evidence if cfg.skip else None
    if cfg.self_condition:
      # Applied with μ̂ = 0 when absent on a V-space call, so that init creates the parameters; the
      # projection has no bias, so skipping it for μ̂ = 0 on an embedded call changes nothing.
      # embedded: μ̂ arrives projected too, as μ̂W_sc [B, L, D] (`self_cond_matrix`, SPEC §4).
      if embedded and self_cond is not None:
        h = h + self_cond.astype(dtype)
      elif self_cond is not None or not embedded:
        mu_hat = jnp.zeros_like(x) if self_cond is None else self_cond
        h = h + self.self_cond_embed(mu_hat.astype(dtype))
    elif self_cond is not None:
      raise ValueError("self_cond was given but model.self_condition is False")
    if cfg.prompt_flag:
      if prompt_mask is not None:
        h = h + prompt_mask[..., None].astype(dtype) * self.prompt_embed.astype(dtype)
    elif prompt_mask is not None:
      raise ValueError("prompt_mask was given but ModelConfig.prompt_flag is False (train with flow.prompt.max_len > 0)")
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    cond = self.conditioning(tau_s, tau_t).astype(dtype)
    rope = rotary_tables(x.shape[1], cfg.head_dim)
    h = trunk(self.blocks, self.final_adaln, cfg.scan_layers, h, cond, rope)
    if hidden:  # the head is applied by the caller, one vocabulary chunk at a time
      h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
      return h if skip is None else (h, skip)
    logits = self.head(h).astype(jnp.float32)
    if skip is not None:
      logits = add_skip(logits, skip)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def build(config: ModelConfig):
  """Returns (init_fn, apply_fn): plain functions of (rng | params, inputs)."""
  module = FlowTransformer(config)

  # Jitted (sizes static): an eager init dispatches and compiles every op on its own, seconds on a CPU.
  @functools.partial(jax.jit, static_argnums=(1, 2))
  def init_fn(rng, batch_size: int, length: int):
    x = jnp.zeros((batch_size, length, config.vocab_size), jnp.float32)
    tau = jnp.zeros((batch_size,), jnp.float32)
    return module.init(rng, x, tau, tau)["params"]

  def apply_fn(params, x, tau_s, tau_t, embedded: bool = False, hidden: bool = False, **conditioning):
    # conditioning: self_cond=, prompt_mask= (see FlowTransformer.__call__)
    return module.apply({"params": params}, x, tau_s, tau_t, embedded=embedded, hidden=hidden, **conditioning)

  return init_fn, apply_fn


def embedding_matrix(params):
  """W [V, D]: the first layer's kernel, h = xW (float32, as all parameters)."""
  return params["embed"]["kernel"]


def whole_table(table):
  """A [V, D] table (W, W_sc) whole on every device, for a gather by token or a product over V.

  The table is sharded over `fsdp` along D, while what is read from it comes out split over
  (data, fsdp) along the batch, and V is rarely a multiple of the tensor axis: XLA cannot go from
  one layout to the other and falls back to replicating the whole result ("involuntary full
  rematerialization"). Gathered first (as every layer's weights are gathered anyway; 0.4 GiB at
  V = 50257, D = 2048), each device reads its own rows.
  """
  return nn.with_logical_constraint(table, (None, None))


def gather_rows(table, tokens):
  """table[tokens]: the rows of a [V, D] table for token ids [B, L] → [B, L, D], batch-sharded."""
  return nn.with_logical_constraint(jnp.take(whole_table(table), tokens, axis=0), ("batch", "length", "embed"))


def self_cond_matrix(params):
  """W_sc [V, D]: the self-conditioning projection, μ̂ ↦ μ̂W_sc (model.self_condition)."""
  return params["self_cond_embed"]["kernel"]


def head_params(params):
  """(kernel [D, V], bias [V]) of the output head, logits = h·kernel + bias."""
  return params["head"]["kernel"], params["head"]["bias"]


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
