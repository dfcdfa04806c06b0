"""Run a README section's first Python block as written, as a user pasting it would."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def run_block(heading: str, cwd: Path, timeout: float = 600) -> str:
    """The stdout of the first ``python`` block after ``heading``, run in ``cwd``; fails
    the test, with its stderr, when the block fails."""
    section = README.read_text().split(heading, 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", block], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
