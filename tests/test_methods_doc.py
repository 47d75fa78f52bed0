"""docs/methods.md is generated from the method declarations and must not go stale."""

from pathlib import Path

from helpers import cli
from mergeng.cli.methods_view import render_markdown
from mergeng.methods.registry import all_methods

DOC = Path(__file__).parent.parent / "docs" / "methods.md"


def test_methods_page_matches_the_declarations():
    assert DOC.read_text() == render_markdown(), "regenerate with: mergeng methods --format markdown > docs/methods.md"


def test_methods_command_lists_every_method():
    result = cli("methods")
    assert result.exit_code == 0
    for name in all_methods():
        assert name in result.stdout
