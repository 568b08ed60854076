"""The course release: student notebooks and autograders made from the book's labs by
otter-grader (``otter assign``), and a check that the autograders work both ways.

Each part of the book has a lab, ``book/<part>/lab.ipynb``, written in otter's assignment
format: the master notebook holds the solutions and the tests, and the book shows it with
the solutions folded. ``python -m lowbit.course [OUT]`` (or ``bash .ci/course``) writes, for
each lab, ``OUT/<part>/student/lab.ipynb`` (solutions removed, a ``grader.check`` cell under
each question) and ``OUT/<part>/autograder/`` (the solution notebook and ``autograder.zip``,
which otter grades with ``otter run -a autograder.zip lab.ipynb`` or on Gradescope).
``python -m lowbit.course --check [OUT]`` also grades each solution notebook (every test
must pass) and each unanswered student notebook (every coding question must score zero,
with no other error on the way).

The book's downloads come from here too: :func:`wheel` builds the ``lowbit`` wheel and
:func:`bundle` packs every notebook of the book with that wheel, the pinned requirements the
notebooks need (JupyterLab included) and a short README into ``lowbit-course.zip``
(``python -m lowbit.course --bundle OUT``; the book build calls it, ``book/_ext/downloads.py``).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["LABS", "MARKER", "lab_paths", "release", "grade", "check", "NOTEBOOK_REQUIREMENTS",
           "notebook_requirements", "wheel", "bundle"]

#: The parts with a lab, in the book's order.
LABS = ("basics", "psgd", "slb", "fqt", "compare")

ROOT = Path(__file__).resolve().parents[2]


def _otter() -> list[str]:
    """The otter command of this environment (it runs the notebooks with this Python)."""
    exe = Path(sys.executable).with_name("otter")
    if not exe.exists():
        raise RuntimeError("otter-grader is not installed in this environment: "
                           "pip install -r requirements.txt")
    return [str(exe)]


def lab_paths(root: Path = ROOT) -> dict[str, Path]:
    """Each part's master lab notebook (an error names any that is missing)."""
    paths = {part: Path(root) / "book" / part / "lab.ipynb" for part in LABS}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"lab notebooks missing: {', '.join(missing)}")
    return paths


#: The file that marks a folder as a course release this tool wrote (and may rewrite).
MARKER = ".lowbit-course-release"


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write into a folder the tool did not make: ``out`` must be missing, empty,
    or hold a release made before (its marker file), unless ``force``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: choose another OUT")
    if force or not out.exists() or (out / MARKER).exists() or not any(out.iterdir()):
        return
    raise FileExistsError(
        f"{out} holds files that lowbit.course did not write (no {MARKER} in it), and the "
        f"release would replace its {', '.join(LABS)} folders and README.md; choose a new or "
        "empty folder, or pass --force (force=True) to replace them")


def release(out: Path, root: Path = ROOT, run_tests: bool = False,
            force: bool = False) -> dict[str, Path]:
    """Run ``otter assign`` on every lab into ``out/<part>``; return each part's folder.

    ``out`` must be new, empty or a release made before (a marker file says so); anything
    else is refused unless ``force``. Every part is built in a temporary folder first and
    moved into place only once all of them succeeded, so a failing lab changes nothing.
    The autograder zip (otter names it after the time) is renamed ``autograder.zip``."""
    out = Path(out)
    _check_out(out, force)
    paths = lab_paths(root)
    out.parent.mkdir(parents=True, exist_ok=True)

    def assign(master: Path, new: Path) -> None:
        cmd = _otter() + ["assign", "--no-pdfs"]
        if not run_tests:
            cmd.append("--no-run-tests")
        run = subprocess.run(cmd + [str(master), str(new)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"otter assign failed on {master} (nothing in {out} was "
                               f"changed):\n{run.stdout}\n{run.stderr}")
        zips = sorted((new / "autograder").glob("*.zip"))
        if len(zips) != 1:
            raise RuntimeError(f"otter assign wrote {len(zips)} autograder zips for {master} "
                               f"(nothing in {out} was changed)")
        zips[0].rename(new / "autograder" / "autograder.zip")

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        with ThreadPoolExecutor(max_workers=2) as pool:  # two otter processes at a time
            jobs = [pool.submit(assign, master, Path(tmp, part)) for part, master in paths.items()]
        for job in jobs:  # the first error, once every part has finished
            job.result()
        Path(tmp, "README.md").write_text(_README)
        out.mkdir(exist_ok=True)
        (out / MARKER).write_text("written by python -m lowbit.course; it may rewrite this folder\n")
        made = {}
        for part in paths:
            dest = out / part
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            Path(tmp, part).rename(dest)
            made[part] = dest
        Path(tmp, "README.md").replace(out / "README.md")
    return made


_README = """# lowbit: the course release

Made by `python -m lowbit.course` (otter-grader's `otter assign`) from the book's labs.

- `<part>/student/lab.ipynb`: hand these out. Solutions are removed; a `grader.check("qN")`
  cell under each coding question runs its tests. Students need the book's environment
  (`pip install -r requirements.txt` and the `lowbit` package) with otter-grader in it.
- `<part>/autograder/autograder.zip`: grades a submission, on Gradescope or locally:
  `otter run -a <part>/autograder/autograder.zip path/to/lab.ipynb` writes `results.json`.
- `<part>/autograder/lab.ipynb`: the solutions, for the instructor.

Written questions (marked `manual` in otter) are graded by hand; the book's version of each lab
shows a model answer, folded.
"""


def grade(autograder: Path, notebook: Path, strict: bool = True) -> dict[str, tuple[float, float]]:
    """Grade ``notebook`` with ``otter run``: ``{question: (score, max_score)}``.

    ``strict``: a cell that raises (other than in a test) fails the grading."""
    missing = [str(p) for p in (Path(autograder), Path(notebook)) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot grade: no such file {', '.join(missing)} "
                                "(make the release with python -m lowbit.course)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = _otter() + ["run", "--no-logo", "-a", str(autograder), "-o", tmp]
        if strict:
            cmd.append("--debug")
        run = subprocess.run(cmd + [str(notebook)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"otter run failed on {notebook}:\n{run.stdout[-3000:]}\n"
                               f"{run.stderr[-3000:]}")
        results = json.loads(Path(tmp, "results.json").read_text())
    return {t["name"]: (float(t["score"]), float(t["max_score"])) for t in results["tests"]
            if t.get("max_score") is not None}


def check(out: Path) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """Grade both notebooks of every released part; raise if a solution loses a point or an
    unanswered student notebook earns one."""
    jobs = {}
    with ThreadPoolExecutor(max_workers=2) as pool:  # two otter processes at a time
        for part in LABS:
            folder = Path(out) / part
            zip_ = folder / "autograder" / "autograder.zip"
            jobs[part] = (pool.submit(grade, zip_, folder / "autograder" / "lab.ipynb"),
                          pool.submit(grade, zip_, folder / "student" / "lab.ipynb"))
    report = {}
    for part in LABS:
        solved, blank = (job.result() for job in jobs[part])
        lost = {q: s for q, s in solved.items() if s[0] < s[1]}
        earned = {q: s for q, s in blank.items() if s[0] > 0}
        if lost or earned or not solved or set(solved) != set(blank):
            raise AssertionError(f"{part}: solution lost points {lost}; unanswered notebook "
                                 f"earned {earned}; questions {sorted(solved)} / {sorted(blank)}")
        report[part] = {"solution": solved, "student": blank}
    return report


#: What a downloaded notebook needs besides ``lowbit``, with the pins of ``requirements.txt``:
#: the package's own dependencies, pandas and ipywidgets (the notebooks import them), and
#: JupyterLab with the widget and plotly extensions to run them in. The book's build
#: and test tools (jupyter-book, nbval, otter-grader, playwright, pytest) are left out.
NOTEBOOK_REQUIREMENTS = ("torch", "numpy", "numba", "pandas", "ipywidgets", "plotly",
                         "loss-landscapes", "mlxtend", "scikit-learn", "mnist1d", "tqdm", "pyyaml",
                         "ipykernel", "jupyterlab", "jupyterlab-widgets")

BUNDLE = "lowbit-course"


def notebook_requirements(root: Path = ROOT) -> str:
    """The lines of ``root/requirements.txt`` that :data:`NOTEBOOK_REQUIREMENTS` names, in
    that file's order, under a header (an error names any requirement the file lacks)."""
    lines, found = [], set()
    for line in Path(root, "requirements.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        name = m and re.sub(r"[._-]+", "-", m.group(1).lower())
        if name in NOTEBOOK_REQUIREMENTS:
            lines.append(line.strip())
            found.add(name)
    missing = [n for n in NOTEBOOK_REQUIREMENTS if n not in found]
    if missing:
        raise ValueError(f"requirements.txt has no line for {', '.join(missing)} "
                         "(lowbit.course.NOTEBOOK_REQUIREMENTS names them)")
    return ("# What the book's notebooks need besides lowbit (install the wheel beside this\n"
            "# file too), pinned as in the book's own requirements.txt.\n" + "\n".join(lines) + "\n")


def wheel(out: Path, root: Path = ROOT) -> Path:
    """Build the ``lowbit`` wheel into ``out`` (pip, with the build backend that
    ``pyproject.toml`` names) from a copy of the sources, so the checkout gains no build
    folders; return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src")
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(Path(root, name), Path(tmp, name))
        shutil.copytree(Path(root, "src", "lowbit"), src / "lowbit",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        built = Path(tmp, "wheel")
        run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                              "-w", str(built), tmp], capture_output=True, text=True)
        wheels = sorted(built.glob("lowbit-*.whl")) if run.returncode == 0 else []
        if len(wheels) != 1:
            raise RuntimeError(f"building the lowbit wheel failed:\n{run.stdout[-3000:]}\n"
                               f"{run.stderr[-3000:]}")
        dest = out / wheels[0].name
        shutil.copy(wheels[0], dest)
    return dest


def _zip_write(z: zipfile.ZipFile, name: str, data: bytes) -> None:
    """One member with a fixed time stamp, so the same files give the same zip."""
    info = zipfile.ZipInfo(name, date_time=(2020, 12, 6, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    z.writestr(info, data)


def bundle(out: Path, root: Path = ROOT) -> dict[str, Path]:
    """Write the ``lowbit`` wheel and ``lowbit-course.zip`` into ``out``: every notebook of
    ``root/book`` (by part, as committed: no outputs), the wheel, the notebooks'
    requirements (:func:`notebook_requirements`) and a README that says how to run them.
    Returns ``{"wheel": path, "bundle": path}``; the zip is replaced only once complete."""
    out = Path(out)
    notebooks = sorted(Path(root, "book").glob("*/*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no notebooks under {Path(root, 'book')}")
    requirements = notebook_requirements(root)
    whl = wheel(out, root)
    dest = out / f"{BUNDLE}.zip"
    tmp = dest.with_name(f".{dest.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        _zip_write(z, f"{BUNDLE}/README.md",
                   _BUNDLE_README.format(n=len(notebooks), wheel=whl.name).encode())
        _zip_write(z, f"{BUNDLE}/requirements.txt", requirements.encode())
        _zip_write(z, f"{BUNDLE}/{whl.name}", whl.read_bytes())
        for nb in notebooks:
            _zip_write(z, f"{BUNDLE}/{nb.relative_to(root).as_posix()}", nb.read_bytes())
    tmp.replace(dest)
    return {"wheel": whl, "bundle": dest}


_BUNDLE_README = """# Training low-bit neural networks: the notebooks

Every notebook of the book ({n} of them, one folder per part in `book/`), the `lowbit`
package they import (`{wheel}`) and the packages they need, pinned
(`requirements.txt`). With Python 3.10 to 3.13, in this folder:

    python3 -m venv .venv
    .venv/bin/pip install -r requirements.txt {wheel}
    .venv/bin/jupyter lab book

(On Windows: `.venv\\Scripts\\pip` and `.venv\\Scripts\\jupyter`.) JupyterLab opens with the
widgets and the plotly figures working; the book's MyST markup (cross-references, notes,
exercises) shows as plain text there, as the published book renders it. Run a notebook top
to bottom (Run > Run All Cells): each runs in about a minute on 2 CPU cores. Trained models and
prepared data are cached in `~/.cache/lowbit` (set `LOWBIT_DATA` to put them elsewhere).

Most chapters train on Fashion-MNIST, read from its four IDX files: on Debian or Ubuntu,
`sudo apt-get install dataset-fashion-mnist` puts them in
`/usr/share/datasets/fashion-mnist`; elsewhere set `LOWBIT_FASHION_MNIST` to a folder that
holds them (the files torchvision and Keras download). Nothing is downloaded while the
notebooks run.

On Linux, pip installs torch's CUDA build (about 5 GB with its NVIDIA libraries; it runs on
the CPU too). For the CPU build alone (about 1 GB), install torch first from PyTorch's CPU
wheel index: `.venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`.

The labs (`book/<part>/lab.ipynb`) hold their solutions; a course hands out the student
versions that `python -m lowbit.course` writes from a checkout of the book's repository.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowbit.course", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "_build" / "course"),
                        help="where to write the release (default: _build/course)")
    parser.add_argument("--check", action="store_true",
                        help="also grade each solution and each unanswered student notebook")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT even if it holds files this tool did not write "
                             "(its part folders and README.md are replaced)")
    parser.add_argument("--bundle", action="store_true",
                        help="write the lowbit wheel and lowbit-course.zip (every notebook) "
                             "into OUT instead")
    args = parser.parse_args(argv)
    if args.bundle:
        for kind, path in bundle(Path(args.out)).items():
            print(f"{kind}: {path}")
        return
    try:
        made = release(Path(args.out), force=args.force)
    except FileExistsError as error:
        parser.exit(2, f"python -m lowbit.course: {error}\n")
    for part, folder in made.items():
        print(f"{part}: {folder / 'student' / 'lab.ipynb'} and {folder / 'autograder' / 'autograder.zip'}")
    if args.check:
        for part, r in check(Path(args.out)).items():
            s = sum(v[0] for v in r["solution"].values()), sum(v[1] for v in r["solution"].values())
            print(f"{part}: solution {s[0]:g}/{s[1]:g}; unanswered student notebook 0/{s[1]:g}")


if __name__ == "__main__":
    main()
