"""An lm-eval-harness model, registered as `cfmjax` (pip install -e '.[eval]').

    lm_eval --model cfmjax --model_args workdir=runs/ar_text_tiny --tasks TASK --include_path DIR
    python -c "import cfmjax.evaluation.lm_eval_adapter" is what registers it; `cfmjax.evaluation.lm_eval_adapter.evaluate`
    runs the harness in-process with the model already loaded.

Requests, on a workdir or an export (`loading.load`):
  loglikelihood          AR baseline: exact, log p(continuation | context) from one causal pass over
                         the row [context, continuation] (the last seq_len tokens when longer), with
                         is_greedy. Flows: minus the conditional likelihood bound (SPEC §5; likelihood.py,
                         "Conditional bounds"): the row is right-aligned so the continuation ends the
                         row, every other position is clean context (left padding: the end-of-document
                         token, or token 0 without one), and only the continuation is diffused and
                         bounded, at bound_points stratified λ per row with a fixed seed, λ1 and the
                         proposal fitted once on bound_selection_rows of the workdir's held-out rows
                         (`evaluate.bound_endpoint`). A lower bound on log p, so is_greedy is False.
                         bound_repeats > 1 averages independent estimates; `last_stderr` then holds
                         each request's standard error from the last call.
  loglikelihood_rolling  the string cut into consecutive windows of seq_len tokens, each scored from its
                         own start (no context carried across windows): exactly for the AR baseline, by
                         the bound of the whole window for flows.
  generate_until         both: prompted block generation (`inference.generate_blocks`): blocks of
                         gen_kwargs max_gen_toks (default 16) tokens after the context, cut at the first
                         `until` string. Flows use `steps` network evaluations per block.
Multi-host (`evaluate`, in every process of a multi-process job, e.g. under launch/local.sh's
variables): process 0 runs the harness; every network call is a collective op (`_everywhere`) that
process 0 broadcasts (op, rows, mask) to the others, which wait in `serve`, so each request batch is
scored on the whole mesh, every process's devices taking their share.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from cfmjax import objectives
from cfmjax.evaluation.evaluate import bound_endpoint, conditional_scorer
from cfmjax.objectives import ar
from cfmjax.parallel import distributed
from cfmjax.run import inference, loading


# Model args (`--model_args k=v,...`; the CLI passes strings) and their defaults.
MODEL_ARGS = {"checkpoint_step": None, "batch_size": 16, "steps": 4, "seed": 0, "sampler": None,
              "bound_points": 128, "bound_repeats": 1, "bound_selection_rows": 64}
HARNESS_ARGS = ("max_batch_size", "device")  # what lm-eval passes to every model; not used here


@register_model("cfmjax")
class CfmjaxLM(LM):

  def __init__(self, workdir: str, **model_args):
    super().__init__()
    unknown = sorted(set(model_args) - set(MODEL_ARGS) - set(HARNESS_ARGS))
    if unknown:
      raise ValueError(f"unknown cfmjax model_args {unknown}; the adapter takes workdir and {sorted(MODEL_ARGS)}")
    args = {**MODEL_ARGS, **{k: v for k, v in model_args.items() if k in MODEL_ARGS and v not in (None, "")}}
    step = args["checkpoint_step"]
    step = None if step is None else (step if step == "best" else int(step))
    self.exp, self.params, self.checkpoint_step = loading.load(workdir, step)
    self.tokenizer = self.exp.data.tokenizer
    self.causal = bool(self.exp.model_config.causal)
    self.batch_size, self.steps, self.seed = int(args["batch_size"]), int(args["steps"]), int(args["seed"])
    self.sampler = args["sampler"] or objectives.get(self.exp.config).sampler
    self.length = self.exp.config.data.seq_len
    self.bound_points, self.bound_repeats = int(args["bound_points"]), int(args["bound_repeats"])
    self.bound_selection_rows = int(args["bound_selection_rows"])
    self.scorer = None  # flows: the conditional bound at a fitted λ1 and proposal, built on first use
    self.last_stderr = None

  # --- scoring -----------------------------------------------------------------------------------

  def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, cut where the joint encoding agrees with the context's."""
    whole = self.tokenizer.encode(context + continuation)
    ctx = self.tokenizer.encode(context) if context else []
    if whole[:len(ctx)] == ctx:
      return ctx, whole[len(ctx):]
    return ctx, self.tokenizer.encode(continuation)

  def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    for _, cont in pairs:
      if not cont:
        raise ValueError("an empty continuation has no likelihood to score")
    rows, mask = self._ar_rows(pairs) if self.causal else self._flow_rows(pairs)
    return self._everywhere("score", rows, mask)

  def _flow_rows(self, pairs):
    """Right-aligned rows (the continuation ends the row; left padding: end-of-document or 0) and the
    scored mask (1 on the continuation, 0 on the clean context)."""
    pad = self.tokenizer.eod_id if getattr(self.tokenizer, "eod_id", None) is not None else 0
    rows = np.full((len(pairs), self.length), pad, np.int32)
    scored = np.zeros((len(pairs), self.length), np.float32)
    for i, (ctx, cont) in enumerate(pairs):
      ids = (ctx + cont)[-self.length:]
      rows[i, self.length - len(ids):] = ids
      scored[i, self.length - min(len(cont), len(ids)):] = 1.0
    return rows, scored

  def _score_flow(self, rows, scored):
    if self.scorer is None:  # λ1 and the proposal fitted once, the bound compiled once
      endpoint = bound_endpoint(self.exp, self.params, self.bound_selection_rows, batch_size=self.batch_size,
                                seed=self.seed)
      self.scorer = conditional_scorer(self.exp, endpoint, num_points=self.bound_points, batch_size=self.batch_size)
    bounds = np.stack([self.scorer(self.params, rows, scored, self.seed + r) for r in range(self.bound_repeats)])
    self.last_stderr = (bounds.std(axis=0, ddof=1) / np.sqrt(len(bounds))).tolist() if len(bounds) > 1 else None
    return [(-float(b), False) for b in bounds.mean(axis=0)]

  def _ar_rows(self, pairs):
    """Left-aligned rows [context, continuation] and the mask of the continuation's positions."""
    rows = np.zeros((len(pairs), self.length), np.int32)
    mask = np.zeros((len(pairs), self.length), np.float32)
    for i, (ctx, cont) in enumerate(pairs):
      ids = (ctx + cont)[-self.length:]
      rows[i, :len(ids)] = ids
      mask[i, len(ids) - min(len(cont), len(ids)):len(ids)] = 1.0
    return rows, mask

  def _score_ar(self, rows, mask):
    nll, greedy = ar.score_rows(self.exp, self.params, rows, mask, self.batch_size, with_greedy=True)
    return [(-float(n), bool(g)) for n, g in zip(nll, greedy)]

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    return self._score([self._split(*r.args) for r in requests])

  def loglikelihood_rolling(self, requests) -> list[float]:
    out = []
    for r in requests:
      ids = self.tokenizer.encode(r.args[0])
      windows = [([], ids[i:i + self.length]) for i in range(0, len(ids), self.length)] or [([], [])]
      out.append(sum(logp for logp, _ in self._score(windows)))
    return out

  # --- generation --------------------------------------------------------------------------------

  def generate_until(self, requests) -> list[str]:
    out = []
    for r in requests:
      context, kwargs = r.args
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      block = max(1, min(int(kwargs.get("max_gen_toks", 16)), self.length - 1))
      ctx = self.tokenizer.encode(context)[-(self.length - block):] if context else []
      rows = np.zeros((1, self.length), np.int32)
      rows[0, :len(ctx)] = ctx
      mask = np.zeros((1, self.length), np.float32)
      mask[0, :len(ctx)] = 1.0  # the context's positions
      text = self.tokenizer.decode(self._everywhere("generate", rows, mask, block))
      cuts = [text.find(u) for u in until if u and u in text]
      out.append(text[:min(cuts)] if cuts else text)
    return out


  # --- collective ops: the harness runs on process 0, the network on every process -----------------

  OPS = ("stop", "score", "generate")

  def _run(self, op: str, rows, mask, block: int):
    if op == "score":
      return self._score_ar(rows, mask) if self.causal else self._score_flow(rows, mask)
    context_len = int(mask[0].sum())
    sampling = inference.Sampling(self.sampler, self.steps, self.batch_size)
    (ids,) = inference.generate_blocks(self.exp, self.params, [rows[0, :context_len].tolist()], sampling, block, 1,
                                       self.seed)
    return ids

  def _everywhere(self, op: str, rows, mask, block: int = 0):
    """`op` on (rows, mask) [N, L] (and a generated block's length), run by every process: process 0
    (the harness's) sends it first."""
    if jax.process_count() > 1:
      _broadcast(self.OPS.index(op), rows, mask, block)
    return self._run(op, rows, mask, block)

  def serve(self):
    """Processes other than 0: run the ops process 0 sends until it sends "stop" (`evaluate`)."""
    while True:
      op, rows, mask, block = _broadcast(0, None, None)
      if self.OPS[op] == "stop":
        return
      self._run(self.OPS[op], rows, mask, block)

  def stop_followers(self):
    if jax.process_count() > 1 and jax.process_index() == 0:
      _broadcast(0, np.zeros((0, self.length), np.int32), np.zeros((0, self.length), np.float32))


def _broadcast(op: int, rows, mask, block: int = 0):
  """(op, rows int32 [N, L], mask float32 [N, L], block) from process 0 to every process: a header
  with the shape first, so the others can post buffers of the right size. Others pass rows=None."""
  source = jax.process_index() == 0
  header = np.asarray([op, *rows.shape, block] if source else [0, 0, 0, 0], np.int64)
  op, n, length, block = (int(v) for v in multihost_utils.broadcast_one_to_all(header))
  if not source:
    rows, mask = np.zeros((n, length), np.int32), np.zeros((n, length), np.float32)
  if n:
    rows, mask = (np.asarray(a) for a in multihost_utils.broadcast_one_to_all((rows, mask)))
  return op, rows, mask, block


def evaluate(workdir: str, tasks: list[str], include_path: str | None = None, **model_args) -> dict | None:
  """lm_eval.simple_evaluate on a cfmjax workdir (tasks from `include_path` too); returns its results.

  In a multi-process job every process calls this: process 0 runs the harness and returns its
  results, the others serve its network calls and return None."""
  import lm_eval  # noqa: PLC0415
  from lm_eval.tasks import TaskManager  # noqa: PLC0415

  if not jax.distributed.is_initialized():
    distributed.maybe_initialize()  # a multi-process job's variables (launch/), else nothing
  model = CfmjaxLM(workdir, **model_args)
  if jax.process_index() != 0:
    model.serve()
    return None
  manager = TaskManager(include_path=include_path) if include_path else None
  try:
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=False,
                                   bootstrap_iters=0)
  finally:
    model.stop_followers()
