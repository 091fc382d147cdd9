"""The built wheel, not the editable install, holds and imports every module of dist_cutmix/.

An editable install finds any module of the source tree, so a subpackage that ``pyproject.toml`` forgets to
ship passes every other test and breaks ``pip install dist_cutmix``. Here the wheel is built from a copy of
the tree (``pip wheel --no-deps --no-build-isolation``, the running venv's setuptools), installed into a
fresh venv with no pip and no editable finder, and imported there by an isolated interpreter (``-I``: no
``PYTHONPATH``, no current directory). The fresh venv takes torch and the other dependencies from the running
venv's site-packages through a ``.pth`` line: a directory added that way is searched, but its own ``.pth``
files, the editable finder among them, are not run. The modules and files expected are read off the source
tree when the test runs, so a new module is covered the day it lands.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = 'dist_cutmix'
# A module may fail to import from the wheel only for want of one of these optional libraries.
OPTIONAL = ('composer', 'timm', 'torchvision', 'lightning', 'accelerate')

# Run inside the fresh venv: import every module, report where each came from or which optional library it lacks.
IMPORT_ALL = '''
import importlib, importlib.util, json, sys, traceback
optional = set(sys.argv[2].split(','))
report = {'missing_optional': sorted(n for n in optional if importlib.util.find_spec(n) is None), 'modules': {}}
for name in sys.argv[1].split(','):
    try:
        report['modules'][name] = {'file': importlib.import_module(name).__file__}
    except ImportError as e:
        root = (e.name or '').partition('.')[0]
        report['modules'][name] = {'lacks': root} if root in optional else {'error': traceback.format_exc()}
    except Exception:
        report['modules'][name] = {'error': traceback.format_exc()}
print(json.dumps(report))
'''


def _source_files() -> list[str]:
    """Every ``.py`` and ``py.typed`` file of the package in the source tree, as paths inside a wheel."""
    files = [p for p in (ROOT / PACKAGE).rglob('*') if p.is_file() and '__pycache__' not in p.parts
             and (p.suffix == '.py' or p.name == 'py.typed')]
    return sorted(str(p.relative_to(ROOT)).replace('\\', '/') for p in files)


def _module_name(path: str) -> str:
    name = path[:-len('.py')].replace('/', '.')
    return name[:-len('.__init__')] if name.endswith('.__init__') else name


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the tree (pyproject.toml, README.md and the package: what the build reads)."""
    src = tmp / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / PACKAGE, src / PACKAGE, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    out = tmp / 'wheel'
    proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
                           '--quiet', '--wheel-dir', str(out), str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f'pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    [wheel] = out.glob(f'{PACKAGE}-*.whl')
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """A venv without pip holding only the installed wheel, the running venv's site-packages behind it."""
    env_dir = tmp / 'venv'
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / 'bin' / 'python'
    site = Path(subprocess.run([str(python), '-I', '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    proc = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '--no-index',
                           '--quiet', str(wheel)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f'pip install of the wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    ours = {sysconfig.get_paths()[k] for k in ('purelib', 'platlib')}
    (site / '_running_venv.pth').write_text(''.join(f'{p}\n' for p in sorted(ours)))
    return python, site


def test_the_wheel_holds_and_imports_every_module_of_the_source_tree(tmp_path: Path) -> None:
    expected = _source_files()
    assert f'{PACKAGE}/__init__.py' in expected and f'{PACKAGE}/py.typed' in expected
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        shipped = sorted(n for n in z.namelist() if n.startswith(f'{PACKAGE}/'))
    missing = sorted(set(expected) - set(shipped))
    assert not missing, f'the wheel leaves out {missing}: pyproject.toml does not ship them'
    stray = sorted(n for n in shipped if n.endswith('.py') and n not in expected)
    assert not stray, f'the wheel holds {stray}, which the source tree does not'

    python, site = _fresh_venv(tmp_path, wheel)
    modules = [_module_name(p) for p in expected if p.endswith('.py')]
    proc = subprocess.run([str(python), '-I', '-c', IMPORT_ALL, ','.join(modules), ','.join(OPTIONAL)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    failed = {m: r['error'] for m, r in report['modules'].items() if 'error' in r}
    assert not failed, 'modules that do not import from the installed wheel:\n' + '\n'.join(
        f'{m}:\n{tb}' for m, tb in failed.items())
    lacking = {m: r['lacks'] for m, r in report['modules'].items() if 'lacks' in r}
    assert set(lacking.values()) <= set(report['missing_optional']), \
        f'modules blamed an optional library that is installed: {lacking}'
    imported = {m: r['file'] for m, r in report['modules'].items() if 'file' in r}
    assert PACKAGE in imported and set(imported) | set(lacking) == set(modules)
    outside = {m: f for m, f in imported.items() if not Path(f).resolve().is_relative_to(site.resolve())}
    assert not outside, f'modules imported from elsewhere than the installed wheel: {outside}'
    if lacking:
        print(f'skipped for want of an optional library: {lacking}')
