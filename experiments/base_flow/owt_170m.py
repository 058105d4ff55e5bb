"""Base flow at the papers' OpenWebText scale: DiT 12 x 768 (~170M), L = 1024 (SPEC §2).

  cfmjax prepare --config=experiments/base_flow/owt_170m.py --out=/data/owt_1024 --workers=16 \
      --config.data.tfds.data_dir=/path/to/tensorflow_datasets     (once)
  cfmjax train --config=experiments/base_flow/owt_170m.py --workdir=gs://BUCKET/runs/owt_170m \
      --config.data.prepared.path=/data/owt_1024

Reads a token store (as lm1b_170m) prepared from `openwebtext` in array_record format in the TFDS
data dir. Same known-good
optimisation as lm1b_170m (AdamW 3e-4, 2500 warmup, constant, clip 1.0, EMA 0.9999, batch 512).
The papers use the GPT-2 tokenizer (V = 50257); here a SentencePiece BPE of the same size is trained
on the train split, or pass --config.data.tokenizer.model_path. OWT has only a train split, so this
config holds out its last 1% (tfds.train_split="train[:-1%]", eval_split="train[-1%:]"). Expect the held-out cross-entropy to fall for
~1M steps; papers report data entropy 5.44 and 4-step distilled gen PPL 75-122 under GPT-2 Large.
"""

import os

from cfmjax.run.configs import from_file


def get_config():
  # The same model and optimisation as lm1b_170m; only the data differ.
  c = from_file(os.path.join(os.path.dirname(__file__), "lm1b_170m.py"))
  c.data.tfds.name = "openwebtext"
  c.data.tfds.train_split = "train[:-1%]"
  c.data.tfds.eval_split = "train[-1%:]"
  c.data.seq_len = 1024
  c.data.tokenizer.vocab_size = 50257
  return c
