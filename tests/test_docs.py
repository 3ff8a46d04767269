"""Every Python block of README.md and docs/*.md runs as written, so the docs cannot rot.

The blocks of one page run in one fresh process, as a user would paste them: on a CPU without the Triton
interpreter (on the GPU when there is one), each block in a namespace of its own, so each must make what it
uses. A block that cannot run here carries a marker on the line before its opening fence, and is reported as
skipped with its reason instead of being left out silently:

    <!-- docs-test: gpu -->              needs a CUDA GPU: runs where there is one, skipped elsewhere
    <!-- docs-test: launch REASON -->    needs a multi-process launch (torchrun, ...): skipped with REASON
    <!-- docs-test: skip REASON -->      not a program (an API synopsis, a template): skipped with REASON
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*docs-test:\s*(gpu|launch|skip)\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the first code line, 1-based
    code: str
    marker: str | None  # "gpu", "launch", "skip" or None
    reason: str

    @property
    def runs_here(self) -> bool:
        return self.marker is None or (self.marker == "gpu" and torch.cuda.is_available())

    @property
    def why_not(self) -> str:
        if self.marker == "gpu":
            return "needs a CUDA GPU"
        return self.reason or f"marked docs-test: {self.marker}"


def python_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        if fence.group(1) == "python":
            marker = MARKER.search(lines[i - 1]) if i > 0 else None
            blocks.append(Block(str(path.relative_to(ROOT)), i + 2, "\n".join(lines[i + 1:end]),
                                marker.group(1) if marker else None, marker.group(2) if marker else ""))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]

# Runs a page's blocks in order, each in a fresh namespace, compiled with the page's line numbers so that a
# traceback points into the Markdown file; reports every failure, not only the first.
RUNNER = textwrap.dedent("""
    import json, sys, traceback
    failed = 0
    for block in json.load(sys.stdin):
        code = "\\n" * (block["line"] - 1) + block["code"]
        try:
            exec(compile(code, block["page"], "exec"), {"__name__": "__main__"})
        except BaseException:
            failed += 1
            print(f"--- {block['page']}:{block['line']} failed:\\n{traceback.format_exc()}", file=sys.stderr)
    sys.exit(1 if failed else 0)
""")


def _environment() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # what a user has: the tests' interpreter is not part of the docs
    env.pop("FLASHOPS_BACKEND", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # pytest-xdist runs one page per core
    return env


@pytest.mark.parametrize("page", sorted({b.page for b in BLOCKS if b.runs_here}))
def test_python_blocks_run_as_written(page):
    blocks = [vars(b) for b in BLOCKS if b.page == page and b.runs_here]
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                          cwd=ROOT, env=_environment(), timeout=600)
    assert done.returncode == 0, f"{page}: a Python block failed\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.runs_here], ids=lambda b: f"{b.page}:{b.line}")
def test_blocks_that_cannot_run_here(block):
    pytest.skip(f"{block.page}:{block.line}: {block.why_not}")


def test_markers_are_well_formed():
    """A misspelt marker would leave its block to run (and fail) or, worse, hide it: every docs-test comment
    must parse and sit right before a Python fence."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if not (line.lstrip().startswith("<!--") and "docs-test" in line):
                continue
            where = f"{page.relative_to(ROOT)}:{i + 1}"
            assert MARKER.search(line), f"{where}: unknown docs-test marker {line.strip()!r}"
            assert i + 1 < len(lines) and lines[i + 1].startswith("```python"), \
                f"{where}: a docs-test marker must be the line right before a ```python fence"
            if MARKER.search(line).group(1) != "gpu":
                assert MARKER.search(line).group(2), f"{where}: say why the block cannot run"
