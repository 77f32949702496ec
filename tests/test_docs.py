"""The docs that are generated or quoted elsewhere stay in sync with the code and CI."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

import diffusion_pref_trainers
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


# The README's documented way to run its Python snippet offline: its three ids become local folders and a few
# `key=value` settings change (CPU precision and optimizer, no push, a short run).
README_SETTINGS = {
    "max_steps": "2", "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1",
    "mixed_precision": '"no"', "optim": '"adamw_torch"', "push_to_hub": "False",
}  # fmt: skip


def _readme_snippet(ids: dict[str, str]) -> str:
    """The README's Python block with `ids` replaced and `README_SETTINGS` applied to its `key=value,` lines."""
    snippet = (ROOT / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in ids.items():
        assert f'"{old}"' in snippet, old
        snippet = snippet.replace(f'"{old}"', repr(new))
    for key, value in README_SETTINGS.items():
        snippet, count = re.subn(rf"^(\s+){key}=.*,$", rf"\g<1>{key}={value},", snippet, flags=re.MULTILINE)
        assert count == 1, key
    return snippet


def test_the_readme_python_snippet_runs_offline_as_the_readme_says(
    tiny_pipe_dir, clip_dir, pairs, tmp_path, monkeypatch
) -> None:
    pairs.save_to_disk(str(tmp_path / "pairs"))
    ids = {
        "stable-diffusion-v1-5/stable-diffusion-v1-5": tiny_pipe_dir,
        "yuvalkirstain/pickapic_v2": str(tmp_path / "pairs"),
        "openai/clip-vit-large-patch14": clip_dir,
    }
    monkeypatch.chdir(tmp_path)  # the snippet's relative output_dir
    namespace: dict = {}
    exec(_readme_snippet(ids), namespace)  # noqa: S102 - the README's code, as a user would paste it
    assert namespace["trainer"].state.global_step == 2
    assert (tmp_path / "sd15-rpo" / "pytorch_lora_weights.safetensors").is_file()
    assert namespace["pipe"].get_active_adapters()  # the fresh pipeline loaded the adapter


def _nav_pages(entries: list) -> set[str]:
    """The page files an mkdocs `nav` lists, at any depth."""
    pages = set()
    for entry in entries:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_the_site_navigation_lists_every_docs_page() -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    assert _nav_pages(nav) == {path.name for path in (ROOT / "docs").glob("*.md")}


def test_the_api_reference_covers_every_export() -> None:
    # Each export is documented where it is defined: the package imports its trainers lazily, which mkdocstrings
    # cannot follow.
    documented = re.findall(r"^::: ([\w.]+)\.(\w+)$", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert sorted(name for _, name in documented) == sorted(diffusion_pref_trainers.__all__)
    for module, name in documented:
        assert getattr(diffusion_pref_trainers, name).__module__ == module, name


def test_ci_builds_the_docs_strictly() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[docs]" -c constraints.txt' in ci and "mkdocs build --strict" in ci


def test_every_accelerate_launch_in_the_docs_names_a_config_file() -> None:
    # Without one, accelerate guesses the process count from the GPUs: 0 on a CPU-only machine, with a warning.
    pages = [ROOT / "README.md", ROOT / "examples" / "train.py", *sorted((ROOT / "docs").glob("*.md"))]
    lines = [(page.name, line.strip('`" ')) for page in pages for line in page.read_text().splitlines()]
    launches = [(name, line) for name, line in lines if line.startswith("accelerate launch ")]
    assert launches
    assert [(name, line) for name, line in launches if "--config_file" not in line] == []


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        fenced = fenced != line.lstrip().startswith("```")
        if not fenced and not line.lstrip().startswith("```"):
            lines.append(line)
    return lines


def _anchors(page: Path) -> Iterator[str]:
    """The anchors of a page's headings, with GitHub's -1, -2 suffixes for repeated ones."""
    seen: dict[str, int] = {}
    for line in _prose(page):
        if match := re.match(r"#{1,6} (.+)", line):
            slug = _github_slug(match.group(1))
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def _broken_links(page: Path) -> list[str]:
    """The page's relative links (and #anchors) that point at no file or no heading."""
    broken = []
    for line in _prose(page):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no file {linked})")
            elif anchor and linked.suffix == ".md" and anchor not in set(_anchors(linked)):
                broken.append(f"{page.name}: {target} (no heading #{anchor} in {linked.name})")
    return broken


def test_every_relative_link_and_anchor_in_the_docs_resolves() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert [broken for page in pages for broken in _broken_links(page)] == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## The cache (`cache_latents`)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#the-cache-cache_latents) [gone](missing.md) [no heading](other.md#nope)\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    assert [line.split(" (")[0] for line in _broken_links(page)] == ["page.md: missing.md", "page.md: other.md#nope"]


def test_the_readme_states_the_stored_command_times() -> None:
    # The README's times are those of the stored run of benchmarks/readme_times.py, not figures typed by hand.
    runs = json.loads((ROOT / "benchmarks" / "results" / "readme_times_cpu.json").read_text())["runs"]
    readme = (ROOT / "README.md").read_text()
    for run in runs.values():
        assert run["returncode"] == 0
        assert f"({round(run['seconds'])} s" in readme or f"; {round(run['seconds'])} s" in readme, run


def test_the_readme_states_the_stored_suite_time_and_default_example_figures() -> None:
    readme = (ROOT / "README.md").read_text()
    suite = json.loads((ROOT / "benchmarks" / "results" / "test_suite_time_cpu.json").read_text())
    assert f"{round(suite['pytest_seconds'])} s of pytest" in readme
    summary = json.loads((ROOT / "benchmarks" / "results" / "default_example_cpu.json").read_text())["summary"]
    for name, digits in (("reward", 3), ("validity", 3), ("distance", 3)):
        before, after = summary[f"{name}/base"], summary[f"{name}/aligned"]
        assert f"{before:.{digits}f} -> {after:.{digits}f}" in readme, name
