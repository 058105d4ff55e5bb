"""Base flow at the papers' OpenWebText scale: DiT 12 x 768 (~170M), L = 1024 (SPEC §2).

  cfmjax train --config=experiments/base_flow/owt_170m.py --workdir=gs://BUCKET/runs/owt_170m \
      --config.data.tfds.data_dir=/path/to/tensorflow_datasets

Needs `openwebtext` prepared in array_record format in the TFDS data dir. Same known-good
optimisation as lm1b_170m (AdamW 3e-4, 2500 warmup, constant, clip 1.0, EMA 0.9999, batch 512).
The papers use the GPT-2 tokenizer (V = 50257); here a SentencePiece BPE of the same size is trained
on the train split, or pass --config.data.tokenizer.model_path. OWT has only a train split, so this
config holds out its last 1% (tfds.train_split="train[:-1%]", eval_split="train[-1%:]"). Expect the held-out cross-entropy to fall for
~1M steps; papers report data entropy 5.44 and 4-step distilled gen PPL 75-122 under GPT-2 Large.
"""

from cfmjax.configs import base_config


def get_config():
  c = base_config()
  c.data.source = "tfds"
  c.data.tfds.name = "openwebtext"
  c.data.tfds.train_split = "train[:-1%]"
  c.data.tfds.eval_split = "train[-1%:]"
  c.data.tfds.text_key = "text"
  c.data.seq_len = 1024
  c.data.tokenizer.vocab_size = 50257

  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.time_features = 256
  c.model.dtype = "bfloat16"

  c.flow.schedule = "mixed"

  c.optim.lr = 3e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 2500
  c.optim.decay = "constant"
  c.optim.clip_norm = 1.0
  c.optim.ema_decay = 0.9999

  c.train.batch_size = 512
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.checkpoint_every = 5000

  c.eval.steps = "1024,128,16,4"
  c.eval.num_samples = 1024
  return c
