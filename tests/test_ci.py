"""The README's first lines and CI agree: CI runs exactly the README's test command."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md must start with a bash block holding the two commands"
    lines = [l.split("#")[0].strip() for l in block.group(1).strip().splitlines()]
    return [l for l in lines if l]


def test_readme_starts_with_demo_and_test_commands():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < 200, "the commands must be the README's first lines"
    demo, tests = _readme_commands()[:2]
    assert "klq demo" in demo and demo.startswith("pip install")
    assert "pytest" in tests and tests.startswith("pip install")


def test_ci_runs_the_readme_test_command():
    tests_cmd = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests_cmd in ci, f"{tests_cmd!r} not found verbatim in .ci/run"
    assert "torch==2.13.0" in (ROOT / "pyproject.toml").read_text()
