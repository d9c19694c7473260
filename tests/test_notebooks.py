"""The notebooks in ``notebooks/`` run top to bottom without an error, and stay small.

Each notebook runs in a fresh Jupyter kernel (nbclient). The kernel is this interpreter, i.e. this test's virtual
environment, whatever kernelspecs the machine has installed elsewhere (a user-level ``python3`` kernelspec may
point at another Python): the test writes its own ``python3`` kernelspec and puts it first on ``JUPYTER_PATH``.
The kernel imports funcpeft from this checkout and runs torch on one thread: the notebooks' models are tiny, so a
second thread gains little, and a single one keeps the run time from collapsing when other processes busy the
cores (measured on a shared 2-core machine: 6-12 s per notebook with one thread, 6-75 s with two).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests._models import oracle

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Outputs are regenerated on every run and committed cleared; these bounds catch a notebook printing whole
# tensors or drawing huge figures.
MAX_TEXT_CHARS = 3000  # any one text output (stream, result, error)
MAX_IMAGE_BYTES = 150_000  # any one PNG, base64-encoded as stored in the notebook


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a ``python3`` kernelspec that runs this interpreter with this checkout on its path."""
    kernelspec = oracle("ipykernel.kernelspec")
    root = tmp_path_factory.mktemp("jupyter")
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    kernelspec.write_kernel_spec(root / "kernels" / "python3", overrides={"env": env})
    return root


def _texts(output: dict) -> list[str]:
    if output["output_type"] == "stream":
        return [output["text"]]
    if output["output_type"] == "error":
        return ["\n".join(output["traceback"])]
    return [v if isinstance(v, str) else "".join(v) for k, v in output["data"].items() if k.startswith("text/")]


def test_every_notebook_is_committed_without_outputs() -> None:
    names = {path.stem for path in NOTEBOOKS}
    assert {"quickstart", "many_adapters", "training_loop", "adalora"} <= names, names
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, f"{path.name}: cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(
    path: Path, jupyter_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbformat = oracle("nbformat")
    nbclient = oracle("nbclient")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    nb = nbformat.read(path, as_version=4)
    # The kernel starts in a scratch folder, so anything a notebook writes stays out of the repository.
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell

    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"cell {i}: {output['ename']}: {output['evalue']}"
            for text in _texts(output):
                assert len(text) <= MAX_TEXT_CHARS, f"cell {i} prints {len(text)} characters: {text[:200]!r}..."
            image = output.get("data", {}).get("image/png", "")
            assert len(image) <= MAX_IMAGE_BYTES, f"cell {i} shows a {len(image)}-byte image"
