"""PSD flow-map distillation of the 1.7B OpenWebText base flow (`base_flow/owt_1p7b.py`).

  cfmjax compile --config=experiments/flow_map/owt_1p7b_psd.py --mesh=4,8,2
  cfmjax distill --config=experiments/flow_map/owt_1p7b_psd.py --workdir=$FLOWMAP --config.init_from=$BASE

The same recipe as owt_170m_psd (150k steps, a quarter of each batch on the diagonal, EMA teacher,
AdamW 1e-4, gradient surgery), on the 1.7B model and its FSDP + tensor mesh. A PSD step runs the
student forward + backward plus two teacher forwards on three quarters of the batch.

Memory (`cfmjax compile`, fake CPU devices, peak estimate per device; README's memory matrix):
17.3 GiB on --mesh=4,8,2 with this file's two microbatches (18.6 GiB in one) and 13.9 GiB on
--mesh=2,64,2 (a v5e-256 slice), no involuntary rematerialisation. Before the vocabulary-chunked
teachers (issue 16) the step needed 111.8 GiB in one batch on 4x8x2, and 53.6 before the activation
constraints were resolved (sharding.activate).
"""

import os

from cfmjax.run.configs import as_distillation, from_file


def get_config():
  base = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "owt_1p7b.py"))
  c = as_distillation(base, "psd", num_steps=150_000, lr=1e-4, warmup_steps=1000, ema_decay=0.9999,
                      gap_warmup_steps=10_000, boundary_prob=0.05)
  c.distill.gradient_surgery = True
  # Two microbatches of 256: 18.6 -> 17.3 GiB per device on 4x8x2, 14.1 -> 13.9 on 2x64x2.
  c.train.grad_accum_steps = 2
  return c
