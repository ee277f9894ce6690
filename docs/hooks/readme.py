"""MkDocs hook: pages take sections of README.md, so the two never disagree.

A page line ``<!-- readme: NAME -->`` becomes the README's text between
``<!-- docs:start NAME -->`` and ``<!-- docs:end NAME -->``. Links that point
into the repository (examples, bench, CONTRIBUTING.md) become plain code, and
links into ``docs/`` are made relative to the guide.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_INCLUDE = re.compile(r"^<!-- readme: ([\w-]+) -->$", re.M)
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _section(readme: str, name: str) -> str:
    match = re.search(rf"<!-- docs:start {name} -->\n(.*?)<!-- docs:end {name} -->", readme, re.S)
    if match is None:
        raise ValueError(f"README.md has no section {name!r} marked for the docs")
    return match.group(1)


def _relink(match: re.Match[str]) -> str:
    bang, text, target = match.groups()
    if target.startswith(("http://", "https://", "#", "mailto:")):
        return match.group(0)
    if target.startswith("docs/"):
        return f"{bang}[{text}]({target.removeprefix('docs/')})"
    return text if text.startswith("`") else f"`{text}`"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    readme = (Path(config["config_file_path"]).parent / "README.md").read_text()
    return _INCLUDE.sub(lambda m: _LINK.sub(_relink, _section(readme, m.group(1))), markdown)
