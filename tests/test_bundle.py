"""The book's downloads (lowbit.course.bundle): the lowbit wheel and lowbit-course.zip with
every notebook. A fresh virtual environment that installs only what the bundle holds (its
requirements.txt and the wheel) runs a downloaded notebook top to bottom, outside the
checkout, so nothing of the repository can stand in for a missing piece."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lowbit import course

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "book/basics/grid.ipynb"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return course.bundle(tmp_path_factory.mktemp("downloads"))


def test_bundle_holds_every_notebook_the_wheel_requirements_and_a_readme(made):
    with zipfile.ZipFile(made["bundle"]) as z:
        names = set(z.namelist())
        readme = z.read("lowbit-course/README.md").decode()
        requirements = z.read("lowbit-course/requirements.txt").decode()
        for nb in ROOT.glob("book/*/*.ipynb"):  # as committed: no outputs
            assert z.read(f"lowbit-course/{nb.relative_to(ROOT).as_posix()}") == nb.read_bytes()
    notebooks = {n for n in names if n.endswith(".ipynb")}
    assert len(notebooks) == len(list(ROOT.glob("book/*/*.ipynb"))) > 30
    assert f"lowbit-course/{made['wheel'].name}" in names
    assert made["wheel"].name in readme and "jupyter lab" in readme
    pinned = {line.split("=")[0].split(">")[0] for line in requirements.splitlines()
              if line and not line.startswith("#")}
    assert pinned == set(course.NOTEBOOK_REQUIREMENTS)
    assert "jupyter-book" not in requirements and "nbval" not in requirements


def test_the_wheel_is_the_one_the_notebooks_and_the_intro_name(made):
    """The version is written out where readers copy it from; a new version must update them."""
    first = json.loads((ROOT / NOTEBOOK).read_text())["cells"]
    install = next("".join(c["source"]) for c in first if c["cell_type"] == "code")
    assert made["wheel"].name in install.replace('"\n', "").replace('                              "', "")
    assert made["wheel"].name in (ROOT / "book" / "intro.md").read_text()


def test_bundle_is_the_same_zip_twice(made, tmp_path):
    again = course.bundle(tmp_path)
    with zipfile.ZipFile(made["bundle"]) as a, zipfile.ZipFile(again["bundle"]) as b:
        assert [(i.filename, i.CRC) for i in a.infolist() if not i.filename.endswith(".whl")] == \
            [(i.filename, i.CRC) for i in b.infolist() if not i.filename.endswith(".whl")]


def test_a_requirement_missing_from_requirements_txt_is_named(tmp_path):
    (tmp_path / "requirements.txt").write_text("torch==2.13.0\nnumpy\n")
    with pytest.raises(ValueError, match="no line for numba"):
        course.notebook_requirements(tmp_path)


def test_a_fresh_venv_with_only_the_bundle_runs_a_downloaded_notebook(made, tmp_path):
    with zipfile.ZipFile(made["bundle"]) as z:
        z.extractall(tmp_path)
    folder = tmp_path / "lowbit-course"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # (--no-compile: no byte-code for the thousands of modules the notebook never imports)
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-compile", "-r",
                              "requirements.txt", made["wheel"].name], cwd=folder,
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    # lowbit comes from the wheel, not from the checkout; data and models go to a fresh folder
    where = subprocess.run([str(py), "-c", "import lowbit; print(lowbit.__file__)"], cwd=folder,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(ROOT) not in where
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOWBIT_", "PYTHON", "JUPYTER"))}
    env.update(LOWBIT_DATA=str(tmp_path / "data"), HOME=str(tmp_path / "home"))
    # executed by nbclient as the book build executes it (book/_ext/execution.py, run by the
    # venv's Python): plain nbconvert sometimes waits out its whole cell timeout after an
    # interact() cell, the lost wake-up that module patches (once in a test run here)
    run = subprocess.run([str(py), str(ROOT / "book" / "_ext" / "execution.py"), "--one",
                          NOTEBOOK, "book/basics/executed.ipynb", "300"], cwd=folder, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    executed = json.loads((folder / "book" / "basics" / "executed.ipynb").read_text())
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code)
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
