"""The README's Python blocks run as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_python_blocks_run():
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
    assert blocks, 'README has no python block'
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), 'exec'), namespace)  # noqa: S102 - our own README
    assert namespace['trainer'].state.timestamp.batch.value == 2
