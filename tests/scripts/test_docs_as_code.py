"""The README and docs/ as code: their Python blocks run, their launch/ commands parse, their links resolve."""
from __future__ import annotations

import importlib.util
import inspect
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / 'README.md'
COMPOSER_PAGE = ROOT / 'docs' / 'composer.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))
PAGES = [README, *DOCS]
README_LIMIT = 10_000  # characters: a front page, the rest in docs/
SETUP_COMMANDS = (
    "python3.11 -m venv .venv && .venv/bin/pip install -e '.[composer,launch]' && .venv/bin/python launch/train.py",
    "python3.11 -m venv .venv && .venv/bin/pip install -e '.[composer,test,launch,bench]' "
    "&& .venv/bin/python -m pytest -n 2 -q",
    "python3.11 -m venv .venv-core && .venv-core/bin/pip install -e "
    "'.[test,launch,bench,accelerate,lightning,torchvision]' "
    "&& .venv-core/bin/python -m pytest -n 2 -q",
)
HAS_COMPOSER = importlib.util.find_spec('composer') is not None
HAS_ACCELERATE = importlib.util.find_spec('accelerate') is not None
HAS_LIGHTNING = importlib.util.find_spec('lightning') is not None
# A launch/ script's command line: after `python`, `composer -n N` or `torchrun --nproc_per_node N`; the script's
# path below launch/ (`train`, `benchmarks/benchmark`, ...) and its arguments.
LAUNCH_COMMAND = r'(?:python|-n \d+|--nproc_per_node[ =]\d+) launch/((?:\w+/)*\w+)\.py([^`\n#&]*)'


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r'```python\n(.*?)```', page.read_text(), flags=re.S)


def _check_readme(ns: dict) -> None:
    # three batches mixed and counted, the loss read the labels (no dense target), the state holds the count
    assert ns['mixer'].batch == 3 and ns['state']['batch'] == 3 and type(ns['y']).__name__ == 'MixedLabels'


def _check_composer(ns: dict) -> None:
    assert ns['trainer'].state.timestamp.batch.value == 2


def _check_metrics(ns: dict) -> None:
    # the page's claims, on its own example
    preds, target = ns['preds'], ns['target']
    assert ns['MulticlassAccuracy'](num_classes=4, average='micro')(preds, target).item() == 0.0
    assert ns['SoftTargetAccuracy'](num_classes=4)(preds, target).item() == pytest.approx(0.425)


def _check_accelerate(ns: dict) -> None:
    # two epochs of 8 batches mixed (soft targets), kept by save_state, and resume() placed after them
    mixer = ns['mixer']
    assert mixer.batch == 16 and mixer.state_dict()['world_size'] == 1 and ns['start'] == 2
    assert ns['y'].shape == (8, 4) and bool((ns['y'].max(dim=1).values < 1).any())
    assert 0 <= float(ns['accuracy'].compute()) <= 1


def _check_plain_pytorch(ns: dict) -> None:
    # the loop ran every batch of both epochs, and mixed them: soft targets whose rows sum to 1
    assert ns['mixer'].batch == 16 and ns['epoch'] == 1
    target = ns['y']
    assert target.shape == (8, 4) and bool((target.max(dim=1).values < 1).any())
    assert target.sum(dim=1).tolist() == [1.0] * 8
    # and checkpointed every 5 batches: the last after batch 15, the count a resume starts from
    import torch

    assert torch.load(ns['path'], weights_only=True)['mixer']['batch'] == 15


def _check_torchvision(ns: dict) -> None:
    # the loop's object mixed (soft labels whose rows sum to 1) and counted its 4 batches, in its state too
    assert ns['labels'].shape == (16, 10) and ns['labels'].sum(1).tolist() == [1.0] * 16
    assert ns['mixup_cutmix'].mixer.batch == 4 and ns['state']['_extra_state']['batch'] == 4


def _check_timm(ns: dict) -> None:
    # the page's odd batch mixed into soft rows; the resumed door took the count, seed and switch
    target, resumed, mixup_fn = ns['target'], ns['resumed'], ns['mixup_fn']
    assert target.shape == (7, 10) and bool((target.max(dim=1).values < 0.91).any())
    assert (resumed.batch, resumed.mixer.seed, resumed.mixup_enabled) == (1, 42, False)
    assert resumed.state_dict() == mixup_fn.state_dict()


def _check_lightning(ns: dict) -> None:
    # two epochs of 8 batches, each mixed and counted (one optimizer step each), and the true accuracy logged
    assert ns['mixing'].mixer.batch == 16 and ns['trainer'].global_step == 16
    assert 0 <= float(ns['trainer'].callback_metrics['mix/train_accuracy_epoch']) <= 1


# Pages that must hold Python blocks, and what their blocks must leave behind.
CHECKS = {'README.md': _check_readme, 'docs/composer.md': _check_composer, 'docs/metrics.md': _check_metrics,
          'docs/design.md': lambda ns: None,
          'docs/plain_pytorch.md': _check_plain_pytorch, 'docs/torchvision.md': _check_torchvision,
          'docs/timm.md': _check_timm, 'docs/accelerate.md': _check_accelerate,
          'docs/lightning.md': _check_lightning}


def test_every_checked_page_exists():
    assert set(CHECKS) <= {_name(p) for p in PAGES}


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    blocks = _python_blocks(page)
    if _name(page) in CHECKS:
        assert blocks, f'{_name(page)} has no python block'
    # Composer itself, or our Composer algorithms (dist_cutmix's own CutMix, ...; not a door's of the same name)
    algorithms = r'\b(CutMix|MixUp|MixUpCutMix|MixingAlgorithm)\b'
    needs_composer = (rf'^\s*(from|import) composer\b|^\s*from dist_cutmix import [^\n]*{algorithms}'
                      rf'|\bdist_cutmix\.{algorithms}')
    if not HAS_COMPOSER and re.search(needs_composer, ''.join(blocks), flags=re.M):
        pytest.skip('needs the composer extra')
    if not HAS_ACCELERATE and re.search(r'^\s*(from|import) (accelerate|dist_cutmix\.accelerate)\b', ''.join(blocks),
                                        flags=re.M):
        pytest.skip('needs the accelerate extra')
    if not HAS_LIGHTNING and re.search(r'^\s*(from|import) (lightning|dist_cutmix\.lightning)\b|\blightning\.pytorch\b',
                                       ''.join(blocks), flags=re.M):
        pytest.skip('needs the lightning extra')
    monkeypatch.chdir(tmp_path)  # what a block writes (Lightning's logs and checkpoints) lands in the test's folder
    monkeypatch.delenv('PL_GLOBAL_SEED', raising=False)  # seed_everything sets it for the process
    namespace: dict = {}
    with warnings.catch_warnings():
        # A reader running the examples must not meet Composer's soft cross-entropy warning.
        warnings.filterwarnings('error', message='.*less than 1 total probability.*')
        for block in blocks:
            exec(compile(block, str(page), 'exec'), namespace)  # noqa: S102 - our own docs
    CHECKS.get(_name(page), lambda ns: None)(namespace)


def _parsers():
    from launch import train, train_plain, visualize
    from launch.benchmarks import bench_loss, bench_memory, benchmark, scaling
    from launch.experiments import experiment, loss_spread
    from launch.tools import gpu_check

    return {
        'train': train.parse_args,
        'train_plain': train_plain.parse_args,
        'visualize': lambda argv: visualize.build_parser().parse_args(argv),
        'benchmarks/benchmark': benchmark._parse_args,
        'benchmarks/bench_memory': bench_memory._parse_args,
        'benchmarks/bench_loss': lambda argv: bench_loss.build_parser().parse_args(argv),
        'benchmarks/scaling': lambda argv: scaling.build_parser().parse_args(argv),
        'experiments/experiment': lambda argv: experiment.build_parser().parse_args(argv),
        'experiments/loss_spread': loss_spread.parse_args,
        'tools/gpu_check': lambda argv: gpu_check.build_parser().parse_args(argv),
    }


@pytest.mark.composer  # launch/train.py checks its flags by building the Composer algorithm they ask for
def test_launch_commands_parse():
    # Every command line the README or docs/ show for a launch/ script is accepted by that script's
    # parser, so a renamed or removed option cannot leave the docs behind.
    parsers = _parsers()
    seen = set()
    for page in PAGES:
        for script, rest in re.findall(LAUNCH_COMMAND, page.read_text()):
            argv = rest.split()
            assert (ROOT / 'launch' / f'{script}.py').exists(), f'{_name(page)} shows launch/{script}.py: no such file'
            if '--help' in argv:
                continue
            assert script in parsers, f'{_name(page)} shows launch/{script}.py, which no test parses'
            try:
                parsers[script](argv)  # argparse exits (SystemExit) on an unknown option or bad value
            except SystemExit as e:
                raise AssertionError(f'{_name(page)}: launch/{script}.py {rest.strip()} does not parse') from e
            seen.add(script)
    assert seen == set(parsers), f'README and docs/ show no command for {set(parsers) - seen}'


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text) <= README_LIMIT, f'README.md has {len(text)} characters, more than {README_LIMIT}'
    for command in SETUP_COMMANDS:
        assert f'\n{command}\n```' in text, f'README lost the set-up command {command!r}'
    assert '`python -m pytest -n 2 -q`' in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(page: Path) -> set[str]:
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r'^#+ (.*)$', text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    return [t for t in re.findall(r'\]\(([^)\s]+)\)', text) if not re.match(r'[a-z]+://', t)]


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_links_resolve(page):
    for link in _links(page):
        path, _, anchor = link.partition('#')
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f'{_name(page)} links to {link}, which does not exist'
        if anchor:
            assert anchor in _anchors(target), f'{_name(page)} links to {link}: no such heading in {path or "itself"}'


# A path from the repository root named in prose, a command or a comment: launch/..., tests/..., docs/...
PATH_IN_TEXT = r'(?<![\w/.\[-])((?:launch|tests|docs|dist_cutmix|\.ci)/[\w/.*-]*[\w*])'


def _missing_paths(text: str, stems: bool = False) -> list[str]:
    """The paths named in ``text`` that name nothing: no file or folder, no file for a glob (``tests/cuda/test_*.py``)
    and, with ``stems``, no file for a stem either (an output name such as ``docs/results/experiment_results``)."""
    missing = []
    for path in sorted(set(re.findall(PATH_IN_TEXT, text))):
        found = list(ROOT.glob(path)) if '*' in path else (ROOT / path).exists()
        if not found and stems:
            found = list(ROOT.glob(path + '.*'))
        if not found:
            missing.append(path)
    return missing


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_paths_named_in_the_page_exist(page):
    # Links are checked above; a path in prose or in a command is not a link, and a moved file leaves it behind.
    missing = _missing_paths(page.read_text())
    assert not missing, f'{_name(page)} names paths that do not exist: {missing}'


def test_paths_named_in_launch_and_tests_exist():
    # Docstrings and comments of the scripts and the tests point at files too (and at output stems).
    files = [p for top in ('launch', 'tests') for p in (ROOT / top).rglob('*.py') if '__pycache__' not in p.parts]
    stale = {_name(p): m for p in files if (m := _missing_paths(p.read_text(), stems=True))}
    assert not stale, f'paths that name nothing: {stale}'


def test_readme_links_every_docs_page():
    linked = {(ROOT / link.partition('#')[0]).resolve() for link in _links(README)}
    missing = [_name(p) for p in DOCS if p.resolve() not in linked]
    assert not missing, f'README.md does not link {missing}'


@pytest.mark.composer
def test_composer_page_argument_table_names_real_arguments():
    from dist_cutmix import CutMix

    text = COMPOSER_PAGE.read_text()
    table = text[text.index('| argument | meaning |'):]
    table = table[:table.index('\n\n')]
    named = set(re.findall(r'`(\w+)`', ''.join(line.split('|')[1] for line in table.splitlines()[2:])))
    params = set(inspect.signature(CutMix).parameters)
    assert named and named <= params, f'docs/composer.md documents {named - params}, which CutMix does not take'


@pytest.mark.composer
def test_composer_page_recipe_block_trains_with_timms_settings():
    # The Composer page's timm recipe block builds the algorithm; here it trains, on the page's own data. The
    # existing block test runs it with Composer's soft cross-entropy warning as an error, but it does not
    # train; training with label smoothing cannot pass that bar: rows (1 - ε)·y + ε/C in float32 sum to 1
    # only to rounding, so Composer's exact check `target.sum() < N` warns in most batches (its own
    # LabelSmoothing too; the page says so). What this test holds instead: the warning is harmless,
    # the loss rescale N / target.sum() it triggers is within 1e-6 of 1.
    import torch
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader

    text = COMPOSER_PAGE.read_text()
    block = next(b for b in _python_blocks(COMPOSER_PAGE) if 'MixUpCutMix' in b)
    ns: dict = {}
    exec(compile(block, 'docs/composer.md', 'exec'), ns)  # noqa: S102 - our own docs
    recipe = ns['recipe']
    assert type(recipe).__name__ == 'MixUpCutMix' and recipe.mode == 'global'
    spec = recipe.spec
    assert (spec.mixup_alpha, spec.cutmix_alpha, spec.switch_prob, spec.prob, spec.label_smoothing) == \
        (0.8, 1.0, 0.5, 1.0, 0.1)
    assert 'less than 1' in text and 'LabelSmoothing' in text  # the page tells the reader about the warning

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(32, 3, 16, 16), torch.randint(0, 4, (32,)))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 4))
    targets = []

    class Keep(torch.nn.Module):  # the loss the Trainer uses, recording each batch's targets
        def forward(self, outputs, target):
            targets.append(target.detach().clone())
            from composer.loss import soft_cross_entropy

            return soft_cross_entropy(outputs, target)

    logger = InMemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = Trainer(model=ComposerClassifier(net, num_classes=4, loss_fn=Keep()),
                          train_dataloader=DataLoader(data, batch_size=8), max_duration='4ba',
                          algorithms=[recipe], loggers=[logger], device='cpu', progress_bar=False, seed=1)
        trainer.fit()
    assert len(targets) == 4 and len(logger.data['mixupcutmix/lambda']) == 4
    for t in targets:
        assert t.shape == (8, 4) and t.dtype == torch.float32
        assert float(t.min()) >= 0.1 / 4 - 1e-7  # every class keeps ε/C
        assert abs(float(t.sum()) - 8) <= 8e-6  # Composer's rescale 8 / t.sum() is 1 within 1e-6
    soft_ce = [w for w in caught if 'total probability' in str(w.message)]
    assert all('less than 1 total probability' in str(w.message) for w in soft_ce)
