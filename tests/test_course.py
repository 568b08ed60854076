"""The course release: otter assign writes every lab's student notebook and autograder, the
solutions pass every test, and the unanswered student notebooks fail every coding question
without any other error (lowbit.course)."""
import json

import pytest

from lowbit import course


def test_release_and_autograders_work_both_ways(tmp_path):
    made = course.release(tmp_path)
    assert list(made) == list(course.LABS)
    assert (tmp_path / "README.md").exists()
    for part, folder in made.items():
        student = json.loads((folder / "student" / "lab.ipynb").read_text())
        code = "".join("".join(c["source"]) for c in student["cells"] if c["cell_type"] == "code")
        assert "BEGIN SOLUTION" not in code and "grader.check(" in code, part
    report = course.check(tmp_path)
    for part, r in report.items():
        assert r["solution"] and all(s == m for s, m in r["solution"].values()), part
        assert all(s == 0 for s, _ in r["student"].values()), part


def test_missing_lab_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="basics/lab.ipynb"):
        course.lab_paths(tmp_path)


def test_grading_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="autograder.zip"):
        course.grade(tmp_path / "autograder.zip", tmp_path / "lab.ipynb")


# ----------------------------------------------------------------------------- nothing lost
FAKE_OTTER = """
import sys, pathlib
args = sys.argv[1:]
master, new = pathlib.Path(args[-2]), pathlib.Path(args[-1])
if "BROKEN" in master.read_text():
    sys.exit("malformed lab")
(new / "autograder").mkdir(parents=True)
(new / "student").mkdir()
(new / "autograder" / "lab-2026.zip").write_text("zip")
(new / "student" / "lab.ipynb").write_text("{}")
"""


@pytest.fixture
def fake_otter(tmp_path, monkeypatch):
    """otter assign replaced by a script that writes a part's files (or fails on a lab that
    says BROKEN), and a book root with every lab."""
    import sys
    script = tmp_path / "otter.py"
    script.write_text(FAKE_OTTER)
    monkeypatch.setattr(course, "_otter", lambda: [sys.executable, str(script)])
    root = tmp_path / "root"
    for part in course.LABS:
        (root / "book" / part).mkdir(parents=True)
        (root / "book" / part / "lab.ipynb").write_text("{}")
    return root


def test_a_folder_the_tool_did_not_write_is_refused(tmp_path, fake_otter):
    out = tmp_path / "out"
    (out / "basics").mkdir(parents=True)
    (out / "basics" / "notes.md").write_text("my notes")
    (out / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{out} holds files that lowbit.course did not write.*--force"):
        course.release(out, root=fake_otter)
    assert (out / "basics" / "notes.md").read_text() == "my notes" and (out / "README.md").read_text() == "mine"
    # the repository itself is such a folder
    with pytest.raises(FileExistsError, match="--force"):
        course.release(course.ROOT, root=fake_otter)
    # --force replaces the part folders and the README, and leaves the rest
    (out / "other.txt").write_text("kept")
    made = course.release(out, root=fake_otter, force=True)
    assert (made["basics"] / "autograder" / "autograder.zip").exists()
    assert not (out / "basics" / "notes.md").exists() and (out / "other.txt").read_text() == "kept"


def test_a_release_made_before_is_rewritten_and_a_file_is_refused(tmp_path, fake_otter):
    out = tmp_path / "out"
    course.release(out, root=fake_otter)
    assert (out / course.MARKER).exists()
    course.release(out, root=fake_otter)           # its own folder: rewritten without --force
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        course.release(tmp_path / "file", root=fake_otter)


def test_a_malformed_lab_changes_nothing(tmp_path, fake_otter):
    out = tmp_path / "out"
    course.release(out, root=fake_otter)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (fake_otter / "book" / course.LABS[-1] / "lab.ipynb").write_text("BROKEN")
    with pytest.raises(RuntimeError, match="nothing in .* was changed"):
        course.release(out, root=fake_otter)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []  # no leftovers


def test_the_command_line_names_the_folder_and_force(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        course.main([str(tmp_path)])
    assert exit_.value.code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "notes.md").read_text() == "mine"
