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


def _parsers():
    from launch import benchmark, experiment, train, visualize

    return {
        'train': train.parse_args,
        'benchmark': benchmark._parse_args,
        'experiment': lambda argv: experiment.build_parser().parse_args(argv),
        'visualize': lambda argv: visualize.build_parser().parse_args(argv),
    }


def test_readme_launch_commands_parse():
    # Every command line the README shows for a launch/ script is accepted by that script's parser,
    # so a renamed or removed option cannot leave the README behind.
    text = README.read_text()
    commands = re.findall(r'(?:python|-n \d+) launch/(\w+)\.py([^`\n#&]*)', text)
    parsers = _parsers()
    seen = set()
    for script, rest in commands:
        argv = rest.split()
        if '--help' in argv:
            continue
        parsers[script](argv)  # argparse exits (SystemExit) on an unknown option or bad value
        seen.add(script)
    assert seen == set(parsers), f'README shows no command for {set(parsers) - seen}'
