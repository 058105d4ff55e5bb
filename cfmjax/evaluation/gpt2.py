"""A GPT-2-family causal LM read from a local Hugging Face directory and run in JAX, as a judge.

The directory is the usual Hugging Face layout (e.g. a copy of `gpt2-large`):

  config.json                      n_embd, n_layer, n_head, n_positions, vocab_size, layer_norm_epsilon
                                   (activation_function: gelu_new (default) | gelu_pytorch_tanh | gelu | relu)
  model.safetensors                wte.weight [V, D], wpe.weight [P, D], h.{i}.ln_1.{weight,bias},
  (or model.safetensors.index.json h.{i}.attn.c_attn.{weight [D, 3D], bias}, h.{i}.attn.c_proj.*,
   with its shards)                h.{i}.ln_2.*, h.{i}.mlp.c_fc.{weight [D, F], bias}, h.{i}.mlp.c_proj.*,
                                   ln_f.*; names may carry a "transformer." prefix; Conv1D layout
                                   [in, out]; the output head is tied to wte
  vocab.json + merges.txt          the byte-level BPE tokenizer (or tokenizer.json)

`GPT2Judge(directory).nll(texts, tokens)` re-tokenises the texts with the model's own tokenizer,
prefixes <|endoftext|> as the beginning of sequence (so that every text token is predicted and
scored), truncates to n_positions, and returns (Σ NLL in nats, number of scored tokens). Batches are
padded to a power-of-two length, so a few shapes cover any set of texts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers


log = logging.getLogger(__name__)

BOS_TOKEN = "<|endoftext|>"
_LAYER_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias")
_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def check_directory(directory: str) -> None:
  """Raises, naming every missing file at once, unless `directory` has what a GPT-2 judge needs."""
  has = lambda name: os.path.exists(os.path.join(directory, name))
  missing = [] if has("config.json") else ["config.json"]
  if not has("model.safetensors") and not has("model.safetensors.index.json"):
    missing.append("model.safetensors" + (" (convert pytorch_model.bin with safetensors.torch.save_file)"
                                          if has("pytorch_model.bin") else ""))
  if not has("tokenizer.json") and not (has("vocab.json") and has("merges.txt")):
    missing += [n for n in ("vocab.json", "merges.txt") if not has(n)]
  _require(directory, *missing)


def _require(directory: str, *names: str) -> None:
  missing = [n for n in names if not os.path.exists(os.path.join(directory, n))]
  if missing:
    raise FileNotFoundError(
        f"{directory} is not a GPT-2 directory in the Hugging Face layout: {', '.join(missing)} missing "
        f"(it needs config.json, model.safetensors and vocab.json + merges.txt or tokenizer.json; "
        f"e.g. a local copy of https://huggingface.co/gpt2-large)")


def load_config(directory: str) -> dict:
  _require(directory, "config.json")
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  missing = [k for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size") if k not in config]
  if missing:
    raise ValueError(f"{directory}/config.json is not a GPT-2 config: it lacks {missing}")
  config.setdefault("layer_norm_epsilon", 1e-5)
  config.setdefault("activation_function", "gelu_new")
  if config["activation_function"] not in _ACTIVATIONS:
    raise ValueError(f"activation_function={config['activation_function']!r} is not supported; "
                     f"supported: {sorted(_ACTIVATIONS)}")
  return config


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    _require(directory, "model.safetensors")
    files = ["model.safetensors"]
  tensors = {}
  for name in files:
    tensors.update(load_file(os.path.join(directory, name)))
  # GPT2LMHeadModel checkpoints prefix the body with "transformer."; the head is tied to wte.
  return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def load_params(directory: str, config: dict, dtype=np.float32) -> dict:
  """{"wte", "wpe", "ln_f.weight", "ln_f.bias", "layers": {name: [n_layer, ...]}} as numpy arrays."""
  tensors = _read_tensors(directory)
  get = lambda name: _tensor(tensors, name, directory).astype(dtype)
  params = {"wte": get("wte.weight"), "wpe": get("wpe.weight"), "ln_f.weight": get("ln_f.weight"),
            "ln_f.bias": get("ln_f.bias")}
  params["layers"] = {p: np.stack([get(f"h.{i}.{p}") for i in range(config["n_layer"])]) for p in _LAYER_PARAMS}
  d, v = config["n_embd"], config["vocab_size"]
  if params["wte"].shape != (v, d) or params["layers"]["attn.c_attn.weight"].shape[1:] != (d, 3 * d):
    raise ValueError(f"{directory}: weight shapes do not match config.json (wte {params['wte'].shape}, "
                     f"c_attn {params['layers']['attn.c_attn.weight'].shape[1:]}; expected ({v}, {d}), ({d}, {3 * d}))")
  return params


def _tensor(tensors, name, directory):
  if name not in tensors:
    raise ValueError(f"{directory}: tensor {name!r} not found in the safetensors weights "
                     f"(have e.g. {sorted(tensors)[:4]})")
  return tensors[name]


def load_tokenizer(directory: str):
  """The byte-level BPE tokenizer (`tokenizers` package): tokenizer.json, else vocab.json + merges.txt."""
  if os.path.exists(os.path.join(directory, "tokenizer.json")):
    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  _require(directory, "vocab.json", "merges.txt")
  tokenizer = Tokenizer(models.BPE.from_file(os.path.join(directory, "vocab.json"),
                                             os.path.join(directory, "merges.txt")))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def _layer_norm(x, weight, bias, eps):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * weight + bias


def forward(params, ids, valid, config: dict):
  """Logits [B, T, V] of the causal LM for token ids [B, T]; `valid` [B, T] masks padding keys."""
  num_heads, eps = config["n_head"], config["layer_norm_epsilon"]
  act = _ACTIVATIONS[config["activation_function"]]
  batch, length = ids.shape
  x = params["wte"][ids] + params["wpe"][:length][None]
  allowed = jnp.tril(jnp.ones((length, length), bool))[None, None] & valid[:, None, None, :]

  def layer(x, p):
    h = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"], eps)
    q, k, v = jnp.split(h @ p["attn.c_attn.weight"] + p["attn.c_attn.bias"], 3, axis=-1)
    heads = lambda t: t.reshape(batch, length, num_heads, -1)
    q, k, v = heads(q), heads(k), heads(v)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, -1)
    x = x + out @ p["attn.c_proj.weight"] + p["attn.c_proj.bias"]
    h = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"], eps)
    h = act(h @ p["mlp.c_fc.weight"] + p["mlp.c_fc.bias"])
    return x + h @ p["mlp.c_proj.weight"] + p["mlp.c_proj.bias"], None

  x, _ = jax.lax.scan(layer, x, params["layers"])
  x = _layer_norm(x, params["ln_f.weight"], params["ln_f.bias"], eps)
  return x @ params["wte"].T


def _sequence_nll(params, ids, valid, config):
  """Per-sequence Σ NLL of ids[:, 1:] given their prefixes, over valid targets."""
  logits = forward(params, ids, valid, config).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid[:, 1:], target, 0.0), axis=-1)


def _log_every(seconds: float, label: str):
  start = last = time.time()

  def report(done, total):
    nonlocal last
    now = time.time()
    if now - last >= seconds or (done >= total and now - start >= seconds):
      log.info("%s: %d/%d texts, %.0fs", label, done, total, now - start)
      last = now

  return report


class GPT2Judge:
  """Scores text with a GPT-2-family model from a local Hugging Face directory (see module doc)."""

  def __init__(self, directory: str, batch_size: int = 16):
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"GPT-2 judge directory {directory} does not exist")
    check_directory(directory)
    self.config = load_config(directory)
    self.tokenizer = load_tokenizer(directory)
    self.bos_id = self.tokenizer.token_to_id(BOS_TOKEN)
    if self.bos_id is None:
      self.bos_id = self.config.get("bos_token_id")
    if self.bos_id is None:
      raise ValueError(f"{directory}: the vocabulary has no {BOS_TOKEN} and config.json no bos_token_id")
    self.params = jax.tree_util.tree_map(jnp.asarray, load_params(directory, self.config))
    # The form of judges.short_name, spelled out: judges imports this module, not the reverse.
    self.name = f"gpt2:{os.path.basename(os.path.normpath(directory))}"
    # Never equal to a cfmjax tokenizer's fingerprint: samples always reach this judge as text.
    self.tokenizer_fingerprint = "hf:" + os.path.basename(directory)
    self.batch_size = batch_size
    self._nll = jax.jit(lambda p, ids, valid: _sequence_nll(p, ids, valid, self.config))
    self._logits = jax.jit(lambda p, ids, valid: forward(p, ids, valid, self.config))
    log.info("GPT-2 judge %s: %d layers, d=%d, vocab %d", self.name, self.config["n_layer"],
             self.config["n_embd"], self.config["vocab_size"])

  def encode(self, texts: list[str]) -> list[list[int]]:
    """<|endoftext|> + the text's tokens, truncated to n_positions."""
    return [[self.bos_id] + e.ids[:self.config["n_positions"] - 1] for e in self.tokenizer.encode_batch(list(texts))]

  def _pad(self, rows: list[list[int]]):
    # Power-of-two lengths (capped at n_positions): few compiled shapes for any mix of lengths.
    longest = max(len(r) for r in rows)
    length = min(self.config["n_positions"], 1 << max(longest - 1, 1).bit_length())
    ids = np.zeros((self.batch_size, length), np.int32)
    valid = np.zeros((self.batch_size, length), bool)
    for i, r in enumerate(rows):
      ids[i, :len(r)], valid[i, :len(r)] = r, True
    return ids, valid

  def logits(self, rows: list[list[int]]) -> np.ndarray:
    """Logits [N, T, V] for token-id rows (at most batch_size), right-padded to the longest row."""
    ids, valid = self._pad(rows)
    longest = max(len(r) for r in rows)
    return np.asarray(self._logits(self.params, ids, valid))[:len(rows), :longest]

  def nll(self, texts=None, tokens=None, progress=None) -> tuple[float, int]:
    """(Σ NLL in nats, number of scored tokens) of the texts; `tokens` (the sampler's ids) are unused:
    the texts are re-tokenised for this model. `progress(done, total)` is called after each batch
    (default: a log line every 10 s, so a long scoring run shows it is moving)."""
    del tokens
    progress = progress or _log_every(10.0, f"scoring with {self.name}")
    rows = self.encode(texts)
    order = np.argsort([len(r) for r in rows])  # similar lengths share a batch (less padding)
    total, count = 0.0, 0
    for start in range(0, len(rows), self.batch_size):
      batch = [rows[i] for i in order[start:start + self.batch_size]]
      ids, valid = self._pad(batch)
      total += float(np.sum(np.asarray(self._nll(self.params, ids, valid), np.float64)))
      count += sum(len(r) - 1 for r in batch)
      if progress is not None:
        progress(min(start + self.batch_size, len(rows)), len(rows))
    return total, count
