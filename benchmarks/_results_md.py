"""One section of benchmarks/RESULTS.md, replaced in place: each benchmark owns its own section."""
from __future__ import annotations

from pathlib import Path

TITLE = "# Benchmark results"


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the section that starts with ``heading`` (up to the next ``## ``) by ``section``,
    or append it; every other section is left as it is. Creates the file if needed."""
    text = path.read_text() if path.exists() else f"{TITLE}\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + ("" if end < 0 else "\n" + text[end + 1:])
    path.write_text(text.rstrip("\n") + "\n")
