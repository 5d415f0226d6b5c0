"""docs/lecture.ipynb executes top to bottom, and is committed without bulky outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "lecture.ipynb"


def test_committed_notebook_has_no_large_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    size = sum(len(str(cell.get("outputs", ""))) for cell in nb.cells)
    assert size < 20_000, "clear the notebook's outputs before committing it"


@pytest.mark.timeout(300)
def test_lecture_notebook_runs(tmp_path, monkeypatch, shakespeare_file):
    # The kernel inherits the environment, so it reads this file instead of downloading: the
    # real corpus, or the stand-in text (same 65 characters) fetched by chargpt's downloader.
    monkeypatch.setenv("CHARGPT_TEXT", str(shakespeare_file))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "65 characters" in text  # the stand-in text has the corpus's characters
    assert "initial loss" in text and "val loss over" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
