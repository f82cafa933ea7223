"""The quickstart notebook runs top to bottom (reduced budget: PDMD_NOTEBOOK_QUICK=1)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "assets", "mnist_teacher", "card.json")),
                    reason="the shipped teacher asset is missing")
def test_quickstart_notebook_executes(monkeypatch, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("PDMD_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("XLA_FLAGS", "")          # one CPU device in the kernel
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart_mnist.ipynb"), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=1500, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "quick mode: True" in outputs
  assert "accuracy" in outputs and "phase 2" in outputs
