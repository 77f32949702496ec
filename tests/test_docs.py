"""The docs that are generated or quoted elsewhere stay in sync with the code and CI."""

from __future__ import annotations

import re
from pathlib import Path

from diffusion_pref_trainers.config_docs import config_reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_page_matches_the_dataclasses() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    regenerate = "python -m diffusion_pref_trainers.config_docs > docs/configuration.md"
    assert page == config_reference(), f"Out of date; regenerate with: {regenerate}"


def test_every_config_field_has_help_text() -> None:
    rows = [line for line in config_reference().splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(pip install .*pytest)$", readme, flags=re.MULTILINE)
    assert len(commands) == 1
    assert commands[0] in (ROOT / ".ci" / "run").read_text()


def test_every_accelerate_launch_in_the_docs_names_a_config_file() -> None:
    # Without one, accelerate guesses the process count from the GPUs: 0 on a CPU-only machine, with a warning.
    pages = [ROOT / "README.md", ROOT / "examples" / "train.py", *sorted((ROOT / "docs").glob("*.md"))]
    lines = [(page.name, line.strip('`" ')) for page in pages for line in page.read_text().splitlines()]
    launches = [(name, line) for name, line in lines if line.startswith("accelerate launch ")]
    assert launches
    assert [(name, line) for name, line in launches if "--config_file" not in line] == []
