"""Generating from a trained model (shared by `cfmjax sample` and `cfmjax eval`; loading.py loads it)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import numpy as np

from cfmjax.models import state_space
from cfmjax.objectives import ar
from cfmjax.parallel import sharding
from cfmjax.run import experiment
from cfmjax.sampling import flow_map, samplers

log = logging.getLogger(__name__)

SAMPLERS = ("euler", "flowmap", "ar")  # ar: KV-cached ancestral sampling of a causal model


class Sampling(NamedTuple):
  """How to sample, as `cfmjax sample`'s flags say it: the sampler (one of SAMPLERS), its steps (the
  AR decoder ignores them), rows per sampler call, and the flow samplers' options (SPEC §8): guidance
  ω (Euler), renoise η (flow map), and the state's precision (samplers.py)."""
  sampler: str
  steps: int
  batch_size: int = 64
  guidance: float | None = None
  renoise: float = 0.0
  precision: str = "float32"


def make_generator(exp: experiment.Experiment, sampling: Sampling, *, conditional: bool = False):
  """A jitted function (params, rng[, prompt_tokens, prompt_mask]) -> tokens [sampling.batch_size, L].

  `conditional`: the function also takes a prompt (tokens, mask [batch_size, L]) whose positions
  the sampler keeps fixed. `guidance` = ω (Euler only) and `renoise` = η (flow map only), SPEC §8.
  A self-conditioned model (model.self_condition) is sampled feeding back its last estimate.
  `precision` = "float64" keeps the flow samplers' state in float64: call the result inside
  `samplers.x64_scope("float64")` (as `generate` does).
  """
  sampler, steps, batch_size, guidance, renoise, precision = sampling
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  if (sampler == "ar") != exp.model_config.causal:
    raise ValueError(f"sampler {sampler!r} does not fit this model: use --sampler=ar for an autoregressive "
                     f"(objective=ar) workdir and euler/flowmap for a flow")
  if guidance is not None and sampler != "euler":
    raise ValueError("--guidance applies to the Euler sampler of the base flow; a flow map distilled "
                     "with distill.guidance has its ω built in")
  if guidance is not None and not conditional:
    raise ValueError("--guidance needs a prompt (--prompt, --prompts_file or --prompt_len)")
  if guidance is not None and not exp.model_config.prompt_flag:
    raise ValueError("--guidance needs a model trained with prompts (flow.prompt.max_len > 0); this one can "
                     "be prompted (by inpainting) but not guided")
  if renoise and sampler != "flowmap":
    raise ValueError("--renoise applies to the flow-map sampler")
  if sampler == "ar" and (guidance is not None or renoise):
    raise ValueError("--guidance and --renoise apply to the flow samplers (euler / flowmap), not ar")
  length, vocab = exp.config.data.seq_len, exp.vocab_size
  self_condition = bool(exp.config.model.get("self_condition", False)) and exp.config.sample.feed_back_estimate

  space = None if sampler == "ar" else state_space.from_config(exp.apply_fn, vocab, exp.config)

  def generate(params, rng, *prompt):
    prompt = tuple(prompt) if conditional else None
    if sampler == "ar":  # one network evaluation per position; `steps` does not apply (ar.py)
      return ar.sample(params, exp.model_config, rng, batch_size, length, prompt=prompt)
    # The state lives where configured (SPEC §4); prompts, guidance and self-conditioning are data
    # for its readout (StateSpace.readout), in either space.
    bound = space.bind(params)
    if sampler == "flowmap":  # k jumps of the flow map ψ(x, s, t) (SPEC §3)
      tokens, _ = flow_map.flowmap_sample(bound, rng, (batch_size, length, vocab), exp.schedule, steps,
                                          conditioning=samplers.Conditioning(prompt), renoise=renoise,
                                          precision=precision)
    else:  # Euler steps of the base flow's denoiser, the diagonal s = t (SPEC §2)
      tokens, _ = samplers.euler_sample(bound, rng, (batch_size, length, vocab), exp.schedule, steps,
                                        conditioning=samplers.Conditioning(prompt, guidance, self_condition),
                                        precision=precision)
    return tokens

  in_shardings = (exp.state_shardings["ema_params"], None)
  if conditional:
    in_shardings += (exp.batch_sharding, exp.batch_sharding)
  return jax.jit(generate, in_shardings=in_shardings, out_shardings=exp.batch_sharding)


def _padded_batch_size(exp, batch_size: int, num_samples: int) -> int:
  dp = sharding.data_parallel_size(exp.mesh, exp.rules)
  return max(dp, (min(batch_size, num_samples) + dp - 1) // dp * dp)


def generate(exp, params, sampling: Sampling, num_samples: int, seed: int, progress=None, *,
             prompts=None) -> np.ndarray:
  """`num_samples` sequences as int32 [num_samples, L], generated `sampling.batch_size` at a time
  (rounded up to a multiple of the data-parallel size).

  `prompts`: None, or (tokens, mask) numpy arrays [num_samples, L] to condition on (SPEC §8).
  `sampling.precision`: the flow samplers' state dtype (samplers.py); float64 runs under a scoped x64.
  """
  batch_size = _padded_batch_size(exp, sampling.batch_size, num_samples)
  sampling = sampling._replace(batch_size=batch_size)
  fn = make_generator(exp, sampling, conditional=prompts is not None)
  out = []
  with exp.activate(), samplers.x64_scope(sampling.precision if sampling.sampler != "ar" else "float32"):
    for i in range(0, num_samples, batch_size):
      args = ()
      if prompts is not None:  # pad the last chunk by repeating its first row
        args = sharding.global_rows(tuple(_pad_rows(np.asarray(a[i:i + batch_size]), batch_size) for a in prompts),
                                    exp.batch_sharding)
      out.append(np.asarray(sharding.to_host(fn(params, jax.random.key(seed + i), *args))))
      if progress is not None:
        progress(min(i + batch_size, num_samples), num_samples)
  return np.concatenate(out)[:num_samples]


def _pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
  if len(rows) == size:
    return rows
  return np.concatenate([rows, np.repeat(rows[:1], size - len(rows), axis=0)])


def prefix_prompts(contexts: list[list[int]], length: int):
  """(tokens, mask) int32 / bool [N, length]: each context at the start of its row, zeros after."""
  tokens = np.zeros((len(contexts), length), np.int32)
  mask = np.zeros((len(contexts), length), bool)
  for i, ctx in enumerate(contexts):
    tokens[i, :len(ctx)] = ctx
    mask[i, :len(ctx)] = True
  return tokens, mask


def generate_blocks(exp, params, contexts: list[list[int]], sampling: Sampling, block_size: int, num_blocks: int,
                    seed: int, progress=None) -> list[list[int]]:
  """Continues each context by `num_blocks` blocks of `block_size` tokens; returns the new tokens.

  Window: the model sees at most seq_len = L positions. Each block is generated from the last
  L − block_size tokens of the text so far (prompt plus earlier blocks) placed at positions
  0 .. P − 1; the sampler fills every position after P (as in training, where all non-prompt
  positions are generated), and the block is positions P .. P + block_size − 1. So the context
  slides forward by block_size tokens per block once the text is longer than L − block_size.
  """
  length = exp.config.data.seq_len
  if not 1 <= block_size <= length:
    raise ValueError(f"block_size must lie in [1, data.seq_len={length}], got {block_size}")
  if num_blocks < 1:
    raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
  texts = [list(c) for c in contexts]
  generated = [[] for _ in contexts]
  for k in range(num_blocks):
    window = [t[max(0, len(t) - (length - block_size)):] for t in texts]
    tokens = generate(exp, params, sampling, len(texts), seed + 7919 * k, prompts=prefix_prompts(window, length))
    for i, w in enumerate(window):
      block = tokens[i, len(w):len(w) + block_size].tolist()
      texts[i] += block
      generated[i] += block
    if progress is not None:
      progress(k + 1, num_blocks)
  return generated
