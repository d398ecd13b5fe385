"""The README's code blocks marked ``<!-- readme-snippet: NAME -->``, for tests to run."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippet(name: str) -> str:
    text = README.read_text()
    found = re.search(rf"<!-- readme-snippet: {re.escape(name)} -->\n```\w*\n(.*?)```", text,
                      re.DOTALL)
    assert found, f"README.md has no snippet {name!r}"
    return found.group(1)
