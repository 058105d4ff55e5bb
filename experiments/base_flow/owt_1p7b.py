"""Base flow at the Scaling-CFM size: DiT 20 x 2048 (1.73B parameters), OpenWebText, L = 1024.

  cfmjax compile --config=experiments/base_flow/owt_1p7b.py --mesh=4,8,2      # check it fits (no data needed)
  cfmjax train   --config=experiments/base_flow/owt_1p7b.py --workdir=gs://BUCKET/runs/owt_1p7b \
      --config.data.prepared.path=/data/owt_1024 --config.mesh.fsdp=8 --config.mesh.tensor=2
      (the store from owt_170m's `cfmjax prepare`: the same data and tokenizer)

Data, tokenizer (V = 50257) and optimisation as owt_170m; width 2048 (16 heads of 128), MLP 8192,
20 layers: 1,729,942,609 parameters by `model.count_params` at V = 50257 (each block holds
16·D² of attention and MLP plus 6·D² of adaLN modulation; the V × D input projection and D × V head
are 2 × 103M). Activations in bfloat16 with full rematerialisation of each block: at batch 512 and
L = 1024 the attention probabilities alone would otherwise hold 16 heads × L² per example and layer.
Meant for a pod slice with FSDP + tensor sharding, e.g. 64 chips as data=4, fsdp=8, tensor=2.

Measured with `cfmjax compile --mesh=4,8,2` (64 fake CPU devices, jax 0.10.2, shared 2-core CPU):
per device 0.45 GiB parameters, 0.45 GiB EMA, 0.90 GiB Adam state and **12.9 GiB of XLA
temporaries (15.2 GiB peak estimate)**; on `--mesh=2,64,2` (a v5e-256 slice, 4 rows per chip)
10.2 GiB. No involuntary rematerialisation. With this file's settings: embedding-space state
(model.state_space auto, V > D) and vocabulary chunks of 8192. Before the model was traced under
the logical-axis rules (sharding.activate) the activations were not split over fsdp: 26.7 GiB on
4x8x2 and 41.7 on 2x64x2. The same compile with the V-dimensional state and no chunking needed 83
GiB of temporaries (the [rows, 1024, V] float32 state, logits and their gradients). CPU buffer
assignment only indicates what a GPU/TPU compilation would need (README, memory matrix).
"""

import os

from cfmjax.run.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "owt_170m.py"))
  c.model.d_model = 2048
  c.model.num_layers = 20
  c.model.num_heads = 16
  c.model.mlp_dim = 8192
  c.model.remat = "full"
  c.model.vocab_chunk = 8192  # never hold [rows, L, 50257] f32 logits at once (24 vs 83 GiB temporaries)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 8, 2
  return c
