"""The README's Python blocks run as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_python_blocks_run():
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
    assert blocks, 'README has no python block'
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), 'exec'), namespace)  # noqa: S102 - our own README
    assert namespace['trainer'].state.timestamp.batch.value == 2
    # the metrics section's claims, on its own example
    preds, target = namespace['preds'], namespace['target']
    assert namespace['MulticlassAccuracy'](num_classes=4, average='micro')(preds, target).item() == 0.0
    assert namespace['SoftTargetAccuracy'](num_classes=4)(preds, target).item() == pytest.approx(0.425)
