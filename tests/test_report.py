"""Reports: Markdown tables carry the records' numbers, plots are valid PNGs, `cfmjax report` merges
several workdirs."""

import json
import math
import struct

from cfmjax.evaluation import report
from tests.conftest import run_cli


def gen(sampler, steps, ppl, entropy, judge="ar:judge", data_entropy=4.31):
  return {"sampler": sampler, "steps": steps, "judge": judge, "num_samples": 256,
          "gen_nll_per_token": math.log(ppl), "gen_ppl": ppl, "entropy": entropy,
          "data_entropy": data_entropy}


AR = [gen("ar", 64, 41.5, 4.12), {"metric": "nll_per_token", "value": 3.25, "ppl": 25.79, "num_tokens": 4096}]
BASE = [gen("euler", k, p, h) for k, p, h in [(1, 900.0, 2.5), (2, 400.0, 3.1), (4, 150.0, 3.6), (8, 90.0, 3.9),
                                               (128, 55.25, 4.2)]]
BASE.append({"metric": "nll_bound_per_token", "value": 3.61, "stderr": 0.02, "ppl_bound": 36.97, "num_tokens": 4096})
PSD = [gen("flowmap", k, p, h) for k, p, h in [(1, 120.5, 3.95), (2, 88.0, 4.01), (4, 70.0, 4.05), (8, 61.0, 4.1)]]


def _row(table, label):
  (line,) = [l for l in table.splitlines() if l.startswith(f"| {label} |")]
  return [c.strip() for c in line.strip("|").split("|")][1:]


def test_comparison_table_puts_each_number_in_its_cell():
  table = report.comparison_table([("AR", AR), ("base", BASE), ("PSD", PSD)])
  assert table.splitlines()[0] == "| model | AR | base | PSD |"
  assert _row(table, "held-out perplexity (AR, exact)") == ["25.79 (3.25 nats)", "-", "-"]
  assert _row(table, "held-out perplexity bound (flow, SPEC §5)") == ["-", "≤ 36.97 (3.61 ± 0.02 nats)", "-"]
  assert _row(table, "gen PPL / entropy, 1 step") == ["-", "900 / 2.5", "120.5 / 3.95"]
  assert _row(table, "gen PPL / entropy, 8 steps") == ["-", "90 / 3.9", "61 / 4.1"]
  assert _row(table, "gen PPL / entropy, 128 steps") == ["-", "55.25 / 4.2", "-"]
  assert _row(table, "gen PPL / entropy, AR sampling (1 evaluation per token)") == ["41.5 / 4.12", "-", "-"]
  assert _row(table, "data entropy (held-out)") == ["4.31", "4.31", "4.31"]
  assert _row(table, "judge") == ["ar:judge", "ar:judge", "ar:judge"]


def test_eval_table_and_several_judges_get_separate_columns():
  table = report.eval_table(BASE)
  assert "| euler | 4 | ar:judge | 256 | 5.0106 | 150 | 3.6 | 4.31 |" in table
  assert "| held-out NLL bound per token (SPEC §5) | 3.61 | 0.02 | 36.97 | 4096 |" in table
  mixed = BASE[:2] + [gen("euler", 1, 700.0, 2.6, judge="gpt2:gpt2-large")]
  header = report.comparison_table([("base", mixed)]).splitlines()[0]
  assert header == "| model | base [ar:judge] | base [gpt2:gpt2-large] |"


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
  return struct.unpack(">II", data[16:24])


def test_plots_are_written_as_png(tmp_path):
  table_path, plot_path = report.write_eval_report(str(tmp_path / "eval"), BASE, "base")
  width, height = _png_size(tmp_path / "eval" / "results.png")
  assert width > 500 and height > 300
  assert "| euler | 128 |" in (tmp_path / "eval" / "results.md").read_text()


def test_without_a_judge_the_plot_has_no_empty_perplexity_panel(tmp_path):
  """Two panels with a judge; without one, only the entropy panel (half as wide) and a line naming
  the --judge values that would fill the other."""
  unjudged = [dict(gen("euler", k, 1.0, h, judge="none"), gen_ppl=None, gen_nll_per_token=None)
              for k, h in [(4, 3.6), (128, 4.2)]]
  report.plot_runs([("base", unjudged)], str(tmp_path / "none.png"))
  report.plot_runs([("base", BASE)], str(tmp_path / "judged.png"))
  (w_none, _), (w_judged, _) = _png_size(tmp_path / "none.png"), _png_size(tmp_path / "judged.png")
  assert w_none < 0.7 * w_judged
  table = report.eval_table(unjudged)
  assert table.splitlines()[0] == "| sampler | steps | judge | num_samples | entropy | data_entropy |"
  assert "no judge scored these samples" in table


def test_report_command_merges_workdirs(tmp_path):
  for name, records in (("w_base", BASE), ("w_psd", PSD)):
    (tmp_path / name / "eval").mkdir(parents=True)
    (tmp_path / name / "eval" / "results.json").write_text(json.dumps(records))
  out = tmp_path / "out"
  stdout, _ = run_cli("report", str(tmp_path / "w_base"), str(tmp_path / "w_psd"), f"--out={out}", "--names=base,psd")
  table = (out / "report.md").read_text()
  assert table.splitlines()[0] == "| model | base | psd |" and "| model | base | psd |" in stdout
  assert _row(table, "gen PPL / entropy, 2 steps") == ["400 / 3.1", "88 / 4.01"]
  _png_size(out / "report.png")


def test_an_ar_runs_held_out_perplexity_is_drawn_as_the_reference_line(monkeypatch, tmp_path):
  import matplotlib.axes  # noqa: PLC0415

  lines = []
  real = matplotlib.axes.Axes.axhline
  monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                      lambda self, y=0, *a, **k: lines.append((y, k.get("label"))) or real(self, y, *a, **k))
  report.plot_runs([("AR", AR), ("base", BASE)], str(tmp_path / "p.png"))
  assert (25.79, "AR held-out perplexity 25.8") in lines


def test_exact_reference_rows_sit_next_to_the_models():
  def markov(sampler, steps, nll):
    return dict(gen(sampler, steps, math.exp(nll), 2.0, judge="exact"), data_nll_per_token=1.43, entropy_rate=1.40)

  records = [markov("euler", 128, 2.37), markov("euler", 4, 2.9), markov("euler_exact", 128, 1.448),
             markov("euler_exact", 4, 1.637)]
  table = report.eval_table(records)
  lines = [l for l in table.splitlines() if l.startswith("| euler")]
  assert [l.split("|")[1:3] for l in lines] == [[" euler ", " 128 "], [" euler_exact ", " 128 "],
                                               [" euler ", " 4 "], [" euler_exact ", " 4 "]]
  assert "gen_nll / floor" in table and lines[1].rstrip().endswith("| 1.013 |")
  comparison = report.comparison_table([("base", records)])
  header = comparison.splitlines()[0]
  assert "base [Euler]" in header and "base [Euler, exact denoiser]" in header
  assert _row(comparison, "gen PPL / entropy, 128 steps") == [f"{report._fmt(math.exp(2.37))} / 2",
                                                              f"{report._fmt(math.exp(1.448))} / 2"]
