"""Evaluation reports: Markdown tables and PNG plots from `eval/results.json` records.

Pure functions of records (see `evaluate.py` for their keys). A record is
  a generation record when it has sampler and steps and no `metric` (judge, gen_ppl, entropy, ...; gen_ppl
    is None when no judge scored it),
  a held-out record when metric = "nll_per_token" (exact NLL of an autoregressive model: value, ppl),
  a bound record when metric = "nll_bound_per_token" (SPEC §5: value, stderr, ppl_bound, num_tokens).

On the Markov source, generation records with sampler "euler_exact" are the Euler sampler run with the
exact posterior (SPEC §9): tables list each right after the model's Euler record of the same step count
(a column of its own beside the model's in comparisons), plots draw it dashed.

`cfmjax eval` writes `eval/results.md` (`eval_table`) and `eval/results.png` (`plot_runs`, one run);
`cfmjax report W1 W2 ...` writes `report.md` (`comparison_table`) and `report.png` (`plot_runs`).
The x axis of the plots is network evaluations per sequence: the step count of a flow sampler. An
autoregressive sampler spends one evaluation per token, so it is drawn as a horizontal line.
"""

from __future__ import annotations

import json
import math
import os

REPORT_STEPS = (1, 2, 4, 8, 128)  # the step counts a comparison always lists (SPEC §7)
AR_SAMPLER = "ar"
EXACT_SAMPLER = "euler_exact"  # evaluate.EXACT_SAMPLER (not imported: report.py stays free of JAX)
SAMPLER_NAMES = {"euler": "Euler", "flowmap": "flow map", AR_SAMPLER: "AR", EXACT_SAMPLER: "Euler, exact denoiser"}


def _fmt(value, digits: int = 4) -> str:
  """Numbers for tables: up to `digits` decimals below 100, 2 below 1e5, else scientific."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  if isinstance(value, float):
    text = f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.2f}" if abs(value) < 1e5 else f"{value:.4g}"
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text
  return str(value)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def generation_records(records: list[dict]) -> list[dict]:
  return [r for r in records if "metric" not in r and "sampler" in r and "steps" in r]


def paired_with_exact(gen: list[dict]) -> list[dict]:
  """Generation records in their order, each euler_exact record moved right after the model's Euler
  record with the same step count (unmatched ones at the end)."""
  exact = [r for r in gen if r["sampler"] == EXACT_SAMPLER]
  out, used = [], set()
  for r in gen:
    if r["sampler"] == EXACT_SAMPLER:
      continue
    out.append(r)
    if r["sampler"] == "euler":
      match = next((i for i, e in enumerate(exact) if i not in used and e["steps"] == r["steps"]), None)
      if match is not None:
        used.add(match)
        out.append(exact[match])
  return out + [e for i, e in enumerate(exact) if i not in used]


def metric_record(records: list[dict], metric: str) -> dict | None:
  """The last record of `metric` (later evals replace earlier ones)."""
  found = [r for r in records if r.get("metric") == metric]
  return found[-1] if found else None


def load_records(path: str) -> list[dict]:
  """Records from a results.json file, or from a workdir / export directory holding eval/results.json."""
  if os.path.isdir(path):
    path = os.path.join(path, "eval", "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `cfmjax eval` on that workdir first")
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# Tables.


def eval_table(records: list[dict]) -> str:
  """One run's results: a row per generation record, then the held-out likelihood figures."""
  gen = paired_with_exact(generation_records(records))
  cols = ["sampler", "steps", "prompt_len", "guidance", "renoise", "judge", "num_samples", "gen_nll_per_token", "gen_ppl", "entropy",
          "data_entropy", "entropy_rate", "data_nll_per_token"]
  # A column nobody filled is left out (no judge: no gen NLL / PPL), and a line below says how to fill it.
  cols = [c for c in cols if any(r.get(c) is not None for r in gen)]
  # gen NLL as a multiple of the floor data_nll_per_token (Markov: the targets of issue 12 are stated so)
  ratio = lambda r: (r["gen_nll_per_token"] / r["data_nll_per_token"]
                     if r.get("gen_nll_per_token") is not None and r.get("data_nll_per_token") else None)
  with_ratio = any(ratio(r) is not None for r in gen)
  parts = []
  if gen:
    header = cols + (["gen_nll / floor"] if with_ratio else [])
    parts.append(_markdown(header, [[_fmt(r.get(c)) for c in cols] + ([_fmt(ratio(r), 3)] if with_ratio else [])
                                    for r in gen]))
    if "gen_ppl" not in cols:
      parts.append(NO_JUDGE_LINE.replace("\n", " ") + ".")
  held_out = metric_record(records, "nll_per_token")
  bound = metric_record(records, "nll_bound_per_token")
  rows = []
  if held_out is not None:
    rows.append(["held-out NLL per token (exact)", _fmt(held_out.get("value")), "-", _fmt(held_out.get("ppl")),
                 _fmt(held_out.get("num_tokens"))])
  if bound is not None:
    rows.append(["held-out NLL bound per token (SPEC §5)", _fmt(bound.get("value")), _fmt(bound.get("stderr")),
                 _fmt(bound.get("ppl_bound")), _fmt(bound.get("num_tokens"))])
  if rows:
    parts.append(_markdown(["likelihood", "nats/token", "stderr", "perplexity", "tokens"], rows))
  return "\n\n".join(parts) if parts else "(no results)"


def _columns(name: str, records: list[dict]) -> list[tuple[str, list[dict]]]:
  """A run's columns: one per (flow sampler, judge) of its generation records, or one per judge
  for an AR-only run. AR generation records join the columns of their judge ("AR sampling" row)."""
  gen = generation_records(records)
  flow_keys = list(dict.fromkeys((r["sampler"], r.get("judge")) for r in gen if r["sampler"] != AR_SAMPLER))
  keys = flow_keys or list(dict.fromkeys((AR_SAMPLER, r.get("judge")) for r in gen))
  if not keys:
    return [(name, [])]
  several_samplers, several_judges = (len({key[i] for key in keys}) > 1 for i in (0, 1))
  columns = []
  for sampler, judge in keys:
    tags = ([SAMPLER_NAMES.get(sampler, sampler)] if several_samplers else []) + ([judge] if several_judges else [])
    label = name + (f" [{', '.join(map(str, tags))}]" if tags else "")
    picked = [r for r in gen if r.get("judge") == judge and r["sampler"] in (sampler, AR_SAMPLER)]
    columns.append((label, picked))
  return columns


def _gen_cell(r: dict | None) -> str:
  if r is None:
    return "-"
  return f"{_fmt(r['gen_ppl'])} / {_fmt(r.get('entropy'), 3)}"


def comparison_table(runs: list[tuple[str, list[dict]]], steps=REPORT_STEPS) -> str:
  """Models side by side (columns) for (name, records) runs.

  Rows: held-out perplexity of an AR model (exact), the flows' perplexity bound, gen PPL / unigram
  entropy at each step count, gen PPL / entropy of AR sampling, the data's entropy, the judge.
  """
  columns = []
  for name, records in runs:
    held_out = metric_record(records, "nll_per_token")
    bound = metric_record(records, "nll_bound_per_token")
    for label, gen in _columns(name, records):
      columns.append((label, gen, held_out, bound))
  all_steps = sorted(set(steps) | {r["steps"] for _, gen, _, _ in columns for r in gen
                                   if r["sampler"] != AR_SAMPLER})
  rows = [["held-out perplexity (AR, exact)"] + [
      "-" if h is None else f"{_fmt(h.get('ppl'))} ({_fmt(h.get('value'))} nats)" for _, _, h, _ in columns]]
  rows.append(["held-out perplexity bound (flow, SPEC §5)"] + [
      "-" if b is None else ("≤ " + _fmt(b["ppl_bound"]) if b.get("ppl_bound") else "exp overflows")
      + f" ({_fmt(b.get('value'))} ± {_fmt(b.get('stderr'), 2)} nats)"
      for _, _, _, b in columns])
  for k in all_steps:
    rows.append([f"gen PPL / entropy, {k} step{'s' if k > 1 else ''}"] + [
        _gen_cell(next((r for r in gen if r["sampler"] != AR_SAMPLER and r["steps"] == k), None))
        for _, gen, _, _ in columns])
  if any(r["sampler"] == AR_SAMPLER for _, gen, _, _ in columns for r in gen):
    rows.append(["gen PPL / entropy, AR sampling (1 evaluation per token)"] + [
        _gen_cell(next((r for r in gen if r["sampler"] == AR_SAMPLER), None)) for _, gen, _, _ in columns])
  rows.append(["data entropy (held-out)"] + [
      _fmt(next((r["data_entropy"] for r in gen if r.get("data_entropy") is not None), None), 3)
      for _, gen, _, _ in columns])
  rows.append(["judge"] + [", ".join(sorted({str(r.get("judge")) for r in gen})) or "-" for _, gen, _, _ in columns])
  return _markdown(["model"] + [c[0] for c in columns], rows)


# ----------------------------------------------------------------------------------------------
# Plots.


NO_JUDGE_LINE = ("no gen perplexity: no judge scored these samples; to get one pass\n--judge=ar:<AR workdir>, "
                 "--judge=gpt2:<HF directory>, or --judge=exact on a Markov source")


def plot_runs(runs: list[tuple[str, list[dict]]], path: str, title: str | None = None) -> str:
  """Gen PPL and unigram entropy against network evaluations, one line per (run, sampler, judge).

  AR sampling is a horizontal dashed line; the data's entropy a dotted grey reference line.
  """
  import matplotlib  # noqa: PLC0415 (plotting is optional at import time)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  import matplotlib.ticker  # noqa: PLC0415

  # A panel with no data is not drawn: without a judge there is no gen PPL, and a line says how to get one.
  has_ppl = any(r.get("gen_ppl") for _, records in runs for r in generation_records(records))
  if has_ppl:
    fig, (ax_ppl, ax_ent) = plt.subplots(1, 2, figsize=(11, 4.2))
  else:
    fig, ax_ent = plt.subplots(1, 1, figsize=(6.5, 4.6))
    ax_ppl = None
    fig.text(0.5, 0.01, NO_JUDGE_LINE, ha="center", va="bottom", fontsize=8)
  data_entropies = set()
  colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
  judges = {r.get("judge") for _, records in runs for r in generation_records(records)}
  for name, records in runs:
    gen = generation_records(records)  # entropy is plotted even where no judge gave a gen PPL
    data_entropies |= {round(r["data_entropy"], 4) for r in gen if r.get("data_entropy") is not None}
    for sampler, judge in dict.fromkeys((r["sampler"], r.get("judge")) for r in gen):
      rows = sorted((r for r in gen if (r["sampler"], r.get("judge")) == (sampler, judge)), key=lambda r: r["steps"])
      kind = "AR sampling, 1 evaluation/token" if sampler == AR_SAMPLER else SAMPLER_NAMES.get(sampler, sampler)
      label = f"{name} ({kind}" + (f", {judge})" if len(judges) > 1 else ")")
      color = next(colors)
      for ax, key in ((ax_ppl, "gen_ppl"), (ax_ent, "entropy")):
        if ax is None:
          continue
        points = [(r["steps"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
          continue
        if sampler == AR_SAMPLER:
          ax.axhline(points[-1][1], color=color, linestyle="--", label=label)
        elif sampler == EXACT_SAMPLER:  # the ideal sampler: a dashed reference curve
          ax.plot(*zip(*points), marker="s", linestyle="--", color=color, label=label)
        else:
          ax.plot(*zip(*points), marker="o", color=color, label=label)
  for value in sorted(data_entropies):
    ax_ent.axhline(value, color="grey", linestyle=":", label=f"data entropy {value:.3f}")
  if has_ppl:  # an AR run's exact held-out perplexity: the reference a judged gen PPL is read against
    for name, records in runs:
      held_out = metric_record(records, "nll_per_token")
      if held_out is not None and held_out.get("ppl"):
        ax_ppl.axhline(held_out["ppl"], color="grey", linestyle=":", label=f"{name} held-out perplexity {held_out['ppl']:.1f}")
  ax_ent.set_ylabel("unigram entropy (nats)")
  axes = [ax_ent]
  if has_ppl:
    ax_ppl.set_ylabel("gen perplexity (judge)")
    ax_ppl.set_yscale("log")
    axes.insert(0, ax_ppl)
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("network evaluations")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=None if has_ppl else (0, 0.07, 1, 1))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# Writers used by the CLI.


def write_eval_report(eval_dir: str, records: list[dict], name: str = "model") -> tuple[str, str]:
  """eval/results.md and eval/results.png for one run's records; returns their paths."""
  os.makedirs(eval_dir, exist_ok=True)
  table_path = os.path.join(eval_dir, "results.md")
  with open(table_path, "w") as f:
    f.write(eval_table(records) + "\n")
  plot_path = plot_runs([(name, records)], os.path.join(eval_dir, "results.png"), title=name)
  return table_path, plot_path


def write_comparison(runs: list[tuple[str, list[dict]]], out: str) -> tuple[str, str]:
  """report.md and report.png under `out` for several runs; returns their paths."""
  os.makedirs(out, exist_ok=True)
  table_path = os.path.join(out, "report.md")
  with open(table_path, "w") as f:
    f.write(comparison_table(runs) + "\n\nCells: gen perplexity under the judge / mean unigram entropy "
            "(nats) of the samples.\n")
  plot_path = plot_runs(runs, os.path.join(out, "report.png"))
  return table_path, plot_path
