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
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["LABS", "lab_paths", "release", "grade", "check"]

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


def release(out: Path, root: Path = ROOT, run_tests: bool = False) -> dict[str, Path]:
    """Run ``otter assign`` on every lab into ``out/<part>``; return each part's folder.

    The autograder zip (otter names it after the time) is renamed ``autograder.zip``.
    A part's folder is replaced only once its new release has been written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for part, master in lab_paths(root).items():
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            new = Path(tmp, part)
            cmd = _otter() + ["assign", "--no-pdfs"]
            if not run_tests:
                cmd.append("--no-run-tests")
            run = subprocess.run(cmd + [str(master), str(new)], capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"otter assign failed on {master}:\n{run.stdout}\n{run.stderr}")
            zips = sorted((new / "autograder").glob("*.zip"))
            if len(zips) != 1:
                raise RuntimeError(f"otter assign wrote {len(zips)} autograder zips for {master}")
            zips[0].rename(new / "autograder" / "autograder.zip")
            dest = out / part
            if dest.exists():
                shutil.rmtree(dest)
            new.rename(dest)
        made[part] = dest
    (out / "README.md").write_text(_README)
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
    report = {}
    for part in LABS:
        folder = Path(out) / part
        zip_ = folder / "autograder" / "autograder.zip"
        solved = grade(zip_, folder / "autograder" / "lab.ipynb")
        blank = grade(zip_, folder / "student" / "lab.ipynb")
        lost = {q: s for q, s in solved.items() if s[0] < s[1]}
        earned = {q: s for q, s in blank.items() if s[0] > 0}
        if lost or earned or not solved or set(solved) != set(blank):
            raise AssertionError(f"{part}: solution lost points {lost}; unanswered notebook "
                                 f"earned {earned}; questions {sorted(solved)} / {sorted(blank)}")
        report[part] = {"solution": solved, "student": blank}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowbit.course", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "_build" / "course"),
                        help="where to write the release (default: _build/course)")
    parser.add_argument("--check", action="store_true",
                        help="also grade each solution and each unanswered student notebook")
    args = parser.parse_args(argv)
    made = release(Path(args.out))
    for part, folder in made.items():
        print(f"{part}: {folder / 'student' / 'lab.ipynb'} and {folder / 'autograder' / 'autograder.zip'}")
    if args.check:
        for part, r in check(Path(args.out)).items():
            s = sum(v[0] for v in r["solution"].values()), sum(v[1] for v in r["solution"].values())
            print(f"{part}: solution {s[0]:g}/{s[1]:g}; unanswered student notebook 0/{s[1]:g}")


if __name__ == "__main__":
    main()
