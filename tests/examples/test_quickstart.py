"""examples/quickstart.ipynb runs end to end in a real Jupyter kernel (nbclient + ipykernel)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "quickstart.ipynb")


def text_of(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


@pytest.mark.slow
def test_the_quickstart_notebook_runs_and_shows_its_results(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert errors == []

    assert "image (8, 8, 1) 10 classes" in text_of(code[1])
    accuracy = float(text_of(code[2]).split("test accuracy ")[1].split()[0])
    assert accuracy > 0.8
    assert "blessed: True" in text_of(code[3])
    assert os.path.isdir(tmp_path / "runs" / "quickstart" / "export" / "model" / "1")
    (report,) = [output["data"]["text/html"] for output in code[4].outputs if output.output_type == "execute_result"]
    assert report.count("data:image/png;base64,") >= 3
    served = text_of(code[5])
    assert served.startswith("true digit 0 predicted ")
    assert served.split("predicted ")[1].strip() in [f"{digit}" for digit in range(10)]
