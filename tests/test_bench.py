"""The measurement scripts whose tables and plots are committed under results/ still run (slow tier):
a merge that breaks one is caught here, not when somebody next needs the figure."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_learning_curves_script_writes_both_curves_and_the_table(tmp_path):
  out = tmp_path / "lc"
  proc = subprocess.run(
      [sys.executable, "bench/learning_curves.py", "--sources=o1_v16", "--steps=4", "--every=2", "--samples=8",
       "--sampler_steps=2", f"--out={out}", f"--workroot={tmp_path / 'runs'}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  curves = json.loads((out / "o1_v16-s0.json").read_text())
  assert [c["model"] for c in curves] == ["flow", "ar"]
  for c in curves:
    assert c["step"] == [2, 4] and all(v > 0 for v in c["gen_nll_per_token"]) and c["floor"] > 0
  assert (out / "o1_v16-s0.png").stat().st_size > 0
  table = (tmp_path / "lc.md").read_text().splitlines()
  assert len(table) == 3 and table[2].startswith("| o1_v16 | 0 | 4 | 2 | 8 |")
