"""The GPT-2 judge on a tiny random GPT-2 that this test writes in the Hugging Face layout, checked
against a plain-numpy reference forward pass written here from the GPT-2 definition."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from cfmjax.evaluation import gpt2

D, LAYERS, HEADS, POSITIONS, EPS = 16, 2, 2, 16, 1e-5


def byte_to_char() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  table, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]


def write_tiny_gpt2(directory, prefix="transformer.", seed=0):
  chars = byte_to_char()
  vocab = {chars[b]: b for b in range(256)}
  for a, b in MERGES:
    vocab[a + b] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "vocab.json").write_text(json.dumps(vocab))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  (directory / "config.json").write_text(json.dumps({
      "model_type": "gpt2", "n_embd": D, "n_layer": LAYERS, "n_head": HEADS, "n_positions": POSITIONS,
      "vocab_size": len(vocab), "layer_norm_epsilon": EPS, "activation_function": "gelu_new"}))
  rng = np.random.default_rng(seed)
  w = lambda *shape: (0.3 * rng.normal(size=shape)).astype(np.float32)
  tensors = {"wte.weight": w(len(vocab), D), "wpe.weight": w(POSITIONS, D),
             "ln_f.weight": 1 + w(D), "ln_f.bias": w(D)}
  for i in range(LAYERS):
    tensors.update({
        f"h.{i}.ln_1.weight": 1 + w(D), f"h.{i}.ln_1.bias": w(D),
        f"h.{i}.attn.c_attn.weight": w(D, 3 * D), f"h.{i}.attn.c_attn.bias": w(3 * D),
        f"h.{i}.attn.c_proj.weight": w(D, D), f"h.{i}.attn.c_proj.bias": w(D),
        f"h.{i}.ln_2.weight": 1 + w(D), f"h.{i}.ln_2.bias": w(D),
        f"h.{i}.mlp.c_fc.weight": w(D, 4 * D), f"h.{i}.mlp.c_fc.bias": w(4 * D),
        f"h.{i}.mlp.c_proj.weight": w(4 * D, D), f"h.{i}.mlp.c_proj.bias": w(D),
        f"h.{i}.attn.bias": np.tril(np.ones((POSITIONS, POSITIONS), np.float32)),  # HF's mask buffer
    })
  tensors = {prefix + k: v for k, v in tensors.items()}
  tensors["lm_head.weight"] = tensors[prefix + "wte.weight"]  # tied head, saved by some exporters
  save_file(tensors, str(directory / "model.safetensors"))
  return vocab, {k.removeprefix(prefix): v for k, v in tensors.items()}


def reference_logits(t, ids):
  """GPT-2 forward for one unpadded sequence, one head and one position at a time, in float64."""
  t = {k: v.astype(np.float64) for k, v in t.items()}

  def norm(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * t[name + ".weight"] + t[name + ".bias"]

  gelu = lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  n, hd = len(ids), D // HEADS
  x = t["wte.weight"][ids] + t["wpe.weight"][:n]
  for i in range(LAYERS):
    p = f"h.{i}."
    qkv = norm(x, p + "ln_1") @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
    q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
    out = np.zeros((n, D))
    for h in range(HEADS):
      cols = slice(h * hd, (h + 1) * hd)
      for pos in range(n):  # attends to positions 0..pos
        s = k[:pos + 1, cols] @ q[pos, cols] / math.sqrt(hd)
        a = np.exp(s - s.max())
        out[pos, cols] = (a / a.sum()) @ v[:pos + 1, cols]
    x = x + out @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
    m = gelu(norm(x, p + "ln_2") @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
    x = x + m @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
  return norm(x, "ln_f") @ t["wte.weight"].T


TEXTS = ["the then", "in an inn", "", "café ☃ the", "then " * 12]


def test_gpt2_judge_matches_a_numpy_reference(tmp_path):
  vocab, tensors = write_tiny_gpt2(tmp_path / "tiny-gpt2")
  judge = gpt2.GPT2Judge(str(tmp_path / "tiny-gpt2"), batch_size=4)
  assert judge.name == "gpt2:tiny-gpt2"

  # Byte-level BPE: merges applied in rank order, a leading space kept as Ġ, any UTF-8 round-trips.
  rows = judge.encode(TEXTS)
  bos = vocab["<|endoftext|>"]
  assert rows[0] == [bos, vocab["t"], vocab["he"], vocab["Ġthe"], vocab["n"]]
  assert rows[2] == [bos]
  assert len(rows[4]) == POSITIONS  # truncated to n_positions, BOS included
  for text, row in zip(TEXTS[:4], rows):
    assert judge.tokenizer.decode(row[1:]) == text

  # Logits of a padded batch (rows of different lengths) against the one-sequence reference.
  batch = [rows[0], rows[1], rows[3]]
  logits = judge.logits(batch)
  for i, row in enumerate(batch):
    np.testing.assert_allclose(logits[i, :len(row)], reference_logits(tensors, row), rtol=1e-4, atol=1e-4)

  # Pooled NLL: every text token scored once (not the BOS), in nats.
  total, count = judge.nll(TEXTS, tokens=None)
  expected_total, expected_count = 0.0, 0
  for row in rows:
    logp = reference_logits(tensors, row)
    logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logp.max(-1, keepdims=True)
    expected_total -= sum(logp[j, row[j + 1]] for j in range(len(row) - 1))
    expected_count += len(row) - 1
  assert count == expected_count == sum(len(r) - 1 for r in rows)
  assert total == pytest.approx(expected_total, rel=1e-5)

  # The same weights without the "transformer." prefix score the same.
  write_tiny_gpt2(tmp_path / "plain", prefix="")
  assert gpt2.GPT2Judge(str(tmp_path / "plain"), batch_size=4).nll(TEXTS[:2])[0] == pytest.approx(
      judge.nll(TEXTS[:2])[0], rel=1e-6)


def test_incomplete_gpt2_directories_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gpt2.GPT2Judge(str(tmp_path / "nowhere"))
  write_tiny_gpt2(tmp_path / "m")
  (tmp_path / "m" / "merges.txt").unlink()
  (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match=r"model.safetensors \(convert pytorch_model.bin.*merges.txt missing"):
    gpt2.GPT2Judge(str(tmp_path / "m"))
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "config.json").write_text(json.dumps({"n_embd": 4}))
  (tmp_path / "c" / "tokenizer.json").write_text("{}")
  (tmp_path / "c" / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="not a GPT-2 config"):
    gpt2.GPT2Judge(str(tmp_path / "c"))
