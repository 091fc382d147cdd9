"""The nets CI relies on reach every file they are meant to, whatever folder it sits in.

``.ci/run`` turns deprecations raised by our modules into errors by listing the modules' names; the GPU check
runs the CUDA tests it finds by a file glob; every launch/ script must start both as a path (``python
launch/benchmarks/benchmark.py``, which puts its own folder first on ``sys.path``) and as a module (``python -m
launch.benchmarks.benchmark``); every folder of launch/ and tests/ is a package whose first line says what it
holds. Each check enumerates the tree when it runs, so a new module or folder is covered the day it lands.
"""
from __future__ import annotations

import ast
import glob
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {'train.py', 'train_plain.py', 'visualize.py'}  # what the README promises under launch/
# Folders whose __init__.py has no docstring yet: tests/doors/ belongs to the doors work under way (its files are
# left alone until it lands); give it one and empty this set.
UNDESCRIBED: set[str] = set()


def _modules(folder: str) -> set[str]:
    """Dotted names of every module of a package folder, subpackages included."""
    names = set()
    for path in (ROOT / folder).rglob('*.py'):
        if '__pycache__' in path.parts:
            continue
        name = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
        names.add(name[:-len('.__init__')] if name.endswith('.__init__') else name)
    return names


def test_ci_makes_deprecations_of_every_module_errors_in_the_processes_tests_start():
    # Run .ci/run's own loop that builds PYTHONWARNINGS, and compare the modules it names with the tree's.
    script = (ROOT / '.ci' / 'run').read_text()
    loop = re.search(r'^filters=\(\)\n.*?^done[^\n]*\n', script, flags=re.S | re.M)
    assert loop, '.ci/run no longer builds its filters in a loop this test can run'
    out = subprocess.run(['bash', '-c', loop.group(0) + 'printf "%s\\n" "${filters[@]}"'], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout.split()
    for category in ('DeprecationWarning', 'FutureWarning'):
        named = {f.rpartition(':')[2] for f in out if f.startswith(f'error::{category}:')}
        expected = _modules('dist_cutmix') | _modules('launch')
        assert named == expected, f'{category}: .ci/run misses {sorted(expected - named)}, ' \
                                  f'names {sorted(named - expected)} that do not exist'


def _needs_cuda(path: Path) -> bool:
    """A test module that runs something only on a GPU: NCCL ranks or a skip for want of CUDA."""
    text = path.read_text()
    return bool(re.search(r'run_nccl_ranks|needs_cuda|needs_two_gpus|skipif\(\s*not torch\.cuda\.is_available\(\)',
                          text))


def test_the_gpu_check_runs_every_test_module_that_needs_cuda():
    from launch.tools.gpu_check import CUDA_TEST_GLOB

    found = {Path(p).resolve() for p in glob.glob(str(ROOT / CUDA_TEST_GLOB))}
    assert found, f'{CUDA_TEST_GLOB} matches nothing under {ROOT}'
    this = Path(__file__).resolve()  # names the patterns it looks for
    needing = {p.resolve() for p in (ROOT / 'tests').rglob('test_*.py') if _needs_cuda(p) and p.resolve() != this}
    missed = sorted(str(p.relative_to(ROOT)) for p in needing - found)
    assert not missed, f'test modules that need CUDA but lie outside {CUDA_TEST_GLOB} (the GPU check skips them): ' \
                       f'{missed}'
    assert needing & found, 'the CUDA test detector finds no CUDA test at all: it would pass anything'


# Run in a fresh interpreter: start each script as `python PATH` and as `python -m MODULE` would, up to its
# `if __name__ == '__main__'`, with nothing of the checkout importable but what the script itself arranges: no
# PYTHONPATH (-I), no editable install of the package (its finder is dropped), no module of ours left cached.
START_EVERY_SCRIPT = '''
import json, runpy, sys
root, scripts = sys.argv[1], json.loads(sys.argv[2])
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]
base = [p for p in sys.path if p not in ('', root)]
failures = {}
for path, module in scripts:
    for how, run in (('path', lambda: runpy.run_path(f'{root}/{path}', run_name='__started__')),
                     ('module', lambda: runpy.run_module(module, run_name='__started__'))):
        for name in [m for m in sys.modules if m.partition('.')[0] in ('launch', 'dist_cutmix')]:
            del sys.modules[name]
        sys.path[:] = [f'{root}/{path}'.rsplit('/', 1)[0]] + base if how == 'path' else [root] + base
        try:
            run()
        except BaseException as e:
            failures[f'{how} {path}'] = f'{type(e).__name__}: {e}'
print(json.dumps(failures))
'''


def test_every_launch_script_starts_as_a_path_and_as_a_module():
    scripts = sorted(p for p in (ROOT / 'launch').rglob('*.py') if "if __name__ == '__main__':" in p.read_text())
    assert {p.name for p in scripts} >= ENTRY_POINTS
    pairs = [(str(p.relative_to(ROOT)), '.'.join(p.relative_to(ROOT).with_suffix('').parts)) for p in scripts]
    proc = subprocess.run([sys.executable, '-I', '-c', START_EVERY_SCRIPT, str(ROOT), json.dumps(pairs)],
                          cwd=ROOT / 'tests', capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.splitlines()[-1])
    assert not failures, f'scripts that do not start: {failures}'


def _docstring(init: Path) -> str | None:
    return ast.get_docstring(ast.parse(init.read_text())) if init.exists() else None


def test_every_folder_of_launch_and_tests_is_a_package_that_says_what_it_holds():
    for top in ('launch', 'tests'):
        folders = [ROOT / top, *(p for p in (ROOT / top).rglob('*') if p.is_dir() and '__pycache__' not in p.parts)]
        for folder in folders:
            init = folder / '__init__.py'
            assert init.exists(), f'{folder.relative_to(ROOT)} has no __init__.py'
            if str(folder.relative_to(ROOT)) not in UNDESCRIBED:
                assert _docstring(init), f'{init.relative_to(ROOT)} does not say what the folder holds'
    loose = {p.name for p in (ROOT / 'launch').glob('*.py')} - ENTRY_POINTS - {'__init__.py'}
    assert not loose, f'launch/ holds {sorted(loose)} beside its entry points: benchmarks/, experiments/ or tools/'
    assert not list((ROOT / 'tests').glob('test_*.py')), 'test modules go in a layer folder of tests/'
    helpers = ROOT / 'tests' / 'helpers'
    assert not list(helpers.glob('test_*.py')), 'tests/helpers/ holds helpers, no tests'
    for path in helpers.glob('*.py'):
        defs = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]
        assert not [d for d in defs if d.startswith('test')], f'{path.relative_to(ROOT)} defines a test'
