"""The README's promises about itself: its first lines are the two commands, and it stays under 15 KB."""

from tests.conftest import ROOT

README = ROOT / "README.md"


def test_the_readme_opens_with_the_demo_and_the_tests_and_stays_under_15_kb():
    text = README.read_text()
    lines = text.splitlines()
    assert lines[0] == "```bash" and lines[3] == "```"
    assert lines[1].startswith("bash launch/demo.sh ") and lines[2].startswith("bash tests/run.sh ")
    assert len(text.encode()) < 15_000, f"README.md is {len(text.encode())} bytes: move detail to docs/"
