"""Denoiser gap before and after a recipe change, one panel per source (issue 12).

  .venv/bin/python bench/gap_before_after.py --out=results/denoiser_gap/before_after.png \
      --pair="o1_v16 (public):W_BEFORE,W_AFTER" --pair="o1_v48_c03:W_BEFORE,W_AFTER" ...

Each W is a Markov workdir after `cfmjax eval --workdir=W --denoiser_gap --steps=0`; the panel shows,
per λ bin, the CE above the exact posterior of both models and of the context-free posterior (what a
model that learned no context scores). The JSON records are copied beside the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--pair", action="append", required=True, help="TITLE:BEFORE_WORKDIR,AFTER_WORKDIR")
  ap.add_argument("--labels", default="before,after")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  labels = args.labels.split(",")
  fig, axes = plt.subplots(1, len(args.pair), figsize=(5.2 * len(args.pair), 4.2), squeeze=False)
  for ax, pair in zip(axes[0], args.pair):
    title, workdirs = pair.rsplit(":", 1)
    records = []
    for label, workdir in zip(labels, workdirs.split(",")):
      path = os.path.join(workdir, "eval", "denoiser_gap.json")
      with open(path) as f:
        records.append(json.load(f))
      slug = title.split()[0]
      shutil.copyfile(path, os.path.join(os.path.dirname(args.out), f"{slug}_{label}.json"))
    for label, record in zip(labels, records):
      lam = [b["lambda_mid"] for b in record["bins"]]
      ax.errorbar(lam, [b["gap"] for b in record["bins"]], yerr=[b.get("gap_stderr") or 0.0 for b in record["bins"]],
                  marker="o", label=f"{label}: model − exact (mean {record['gap']:.4f})")
    record = records[0]
    ax.plot([b["lambda_mid"] for b in record["bins"]], [b["context_free_ce"] - b["exact_ce"] for b in record["bins"]],
            marker="^", linestyle="--", color="grey",
            label=f"context-free − exact (mean {record['context_free_ce'] - record['exact_ce']:.4f})")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(title)
    ax.set_xlabel("λ = log SNR")
    ax.set_ylabel("held-out CE above the exact posterior (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(args.out)


if __name__ == "__main__":
  main()
