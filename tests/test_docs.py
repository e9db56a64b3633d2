"""The documentation stays true: the generated command reference is current, every option is
documented, the README stays a front page, no page names a path of a development machine, and
every relative link leads to a file."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import click
import pytest

from charlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCRIPT = ROOT / "scripts" / "command_reference.py"
# An absolute path of a development machine, not a URL's path or a relative one.
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|root|home|Users)/")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def command_reference() -> ModuleType:
    """scripts/command_reference.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location("command_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands(group: click.Group, prefix: str = "charlm") -> Iterator[tuple[str, click.Command]]:
    """Every command under `group`, hidden ones included, with its full name."""
    for name, command in group.commands.items():
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")


def manual() -> str:
    """The text of every page under docs/."""
    return "\n".join(page.read_text(encoding="utf-8") for page in sorted(DOCS.glob("*.md")))


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository that a reader sees."""
    return [
        ROOT / "README.md",
        *sorted(DOCS.glob("*.md")),
        *sorted((ROOT / "benchmarks").glob("*.md")),
        ROOT / "corpora" / "README.md",
        *sorted((ROOT / "tests" / "data").glob("**/README.md")),
    ]


def test_command_reference_is_current() -> None:
    rendered = command_reference().render()
    current = (DOCS / "commands.md").read_text(encoding="utf-8")
    assert current == rendered, (
        "docs/commands.md is not the commands' help now: run python scripts/command_reference.py"
    )


def test_command_reference_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = command_reference()
    module.REFERENCE = tmp_path / "commands.md"
    module.REFERENCE.write_text("stale\n", encoding="utf-8")
    module.ROOT = tmp_path
    assert module.run(["--check"]) == 1
    assert "run python scripts/command_reference.py" in capsys.readouterr().err
    assert module.run([]) == 0
    assert module.run(["--check"]) == 0


def test_command_reference_has_every_visible_command() -> None:
    reference = (DOCS / "commands.md").read_text(encoding="utf-8")
    visible = [name for name, command in commands(main) if not command.hidden]
    assert {"charlm corpus get", "charlm punctuate train", "charlm punctuate score"} <= set(visible)
    for name in ["charlm", *visible]:
        assert f"\n## {name}\n" in reference, name


def test_docs_document_every_command_and_option() -> None:
    text = manual()
    for name, command in commands(main):
        for param in command.params:
            for option in param.opts:
                if option.startswith("--"):
                    assert option in text, f"docs/ does not document {name} {option}"


def test_readme_is_a_front_page() -> None:
    readme = ROOT / "README.md"
    size = readme.stat().st_size
    lines = readme.read_text(encoding="utf-8").count("\n")
    assert size < 30_000, f"README.md is {size:,} bytes: move detail into docs/"
    assert lines < 450, f"README.md is {lines} lines: move detail into docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_development_machine_paths(path: Path) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        assert not MACHINE_PATH.search(line), f"{path.relative_to(ROOT)}:{number}: {line}"


@pytest.mark.parametrize(
    "path",
    [ROOT / "README.md", *sorted(DOCS.glob("*.md"))],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_relative_links_lead_to_files(path: Path) -> None:
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#", 1)[0]
        assert (path.parent / file).is_file(), f"{path.relative_to(ROOT)} links to {target}"
