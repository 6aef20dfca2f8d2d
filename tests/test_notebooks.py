"""The Colab demo runs: its code cells are executed in order (shell lines like `!pip` skipped)."""

import json
import os

import matplotlib

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "tiny_antidistillation.ipynb")


def test_demo_notebook_runs(tmp_path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr("tempfile.mkdtemp", lambda prefix="": str(tmp_path))
  with open(NOTEBOOK) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  namespace = {}
  for i, cell in enumerate(cells):
    source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    exec(compile(source, f"{NOTEBOOK} cell {i}", "exec"), namespace)  # noqa: S102
  results = namespace["results"]
  assert set(results) == {"student (plain traces)", "student (ads traces)", "teacher (ads)"}
  assert all(0.0 <= r["accuracy"] <= r["forced_accuracy"] <= 1.0 for r in results.values())
  assert os.path.exists(tmp_path / "distill_ads" / "curves.png")
