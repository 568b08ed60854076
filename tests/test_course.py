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
