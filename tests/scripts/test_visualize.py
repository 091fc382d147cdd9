"""launch/visualize.py: the captions name the crop each image received (batch and per-sample boxes, and the
MixUp/CutMix switch, checked against the engine's draw applied by hand), and the command writes a decodable PNG
with the boxes outlined.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')
from tests.helpers.scripts import PYTHON, run_script
from tests.helpers.spawn import run_ranks

# ----------------------------------------------------------------------------- visualize.py


def _mix_for_picture(rank: int, world_size: int) -> dict:
    from launch.visualize import mix_on_rank

    return mix_on_rank(rank, world_size, 3, 3, 0, 1.0)


def test_visualize_captions_name_the_crop_each_image_received(tmp_path):
    records = run_ranks(_mix_for_picture, 2, tmp_path, deadline_s=60)
    y0, y1, x0, x1 = records[0]['box']
    assert all(r['box'] == records[0]['box'] and r['lam'] == records[0]['lam'] for r in records)
    assert (y1 - y0) * (x1 - x0) > 0
    for rec in records:
        for i in range(rec['mixed'].shape[0]):
            p, j = int(rec['partner_rank'][i]), int(rec['partner_index'][i])
            partner = records[p]['original'][j]
            assert torch.equal(rec['mixed'][i, :, y0:y1, x0:x1], partner[:, y0:y1, x0:x1])
            assert int(rec['partner_label'][i]) == int(records[p]['label'][j])
    assert any(int(r) != rec['rank'] for rec in records for r in rec['partner_rank'])


def _mix_per_sample_for_picture(rank: int, world_size: int) -> dict:
    from launch.visualize import mix_on_rank

    return mix_on_rank(rank, world_size, 4, 3, 0, 1.0, per_sample=True)


def test_visualize_per_sample_pastes_each_partner_crop_inside_its_own_box(tmp_path):
    records = run_ranks(_mix_per_sample_for_picture, 2, tmp_path, deadline_s=60)
    boxes = torch.cat([r['box'] for r in records])
    assert boxes.shape == (8, 4) and all(r['lam'].shape == (4,) for r in records)
    assert len({tuple(b.tolist()) for b in boxes}) > 1  # not one box for the batch
    for rec in records:
        for i in range(rec['mixed'].shape[0]):
            y0, y1, x0, x1 = (int(v) for v in rec['box'][i])
            p, j = int(rec['partner_rank'][i]), int(rec['partner_index'][i])
            partner, own = records[p]['original'][j], rec['original'][i]
            assert torch.equal(rec['mixed'][i, :, y0:y1, x0:x1], partner[:, y0:y1, x0:x1])
            outside = torch.ones(28, 28, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert torch.equal(rec['mixed'][i, 0][outside], own[0][outside])
            assert float(rec['lam'][i]) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 28 ** 2)
    assert any(int(r) != rec['rank'] for rec in records for r in rec['partner_rank'])


def test_visualize_cli_writes_a_decodable_png(tmp_path):
    from PIL import Image

    out = tmp_path / 'grid.png'
    run_script([PYTHON, 'launch/visualize.py', '--out', str(out), '--per-rank', '2', '--dpi', '40'])
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        # figsize (2.3 * per_rank, 2.75 * 2 * world_size) inches at 40 dpi
        assert img.format == 'PNG' and img.size == (184, 440)
        rgb = torch.tensor(list(img.convert('RGB').getdata()))
    red = (rgb[:, 0] > 200) & (rgb[:, 1] < 80) & (rgb[:, 2] < 80)
    assert int(red.sum()) > 20  # the boxes are outlined


def test_visualize_cli_per_sample_writes_its_own_png(tmp_path):
    from PIL import Image

    from launch.visualize import OUT_PER_SAMPLE, build_parser, default_out

    assert default_out(build_parser().parse_args(['--per-sample'])) == OUT_PER_SAMPLE
    out = tmp_path / 'grid.png'
    proc = run_script([PYTHON, 'launch/visualize.py', '--per-sample', '--out', str(out), '--per-rank', '2',
                       '--dpi', '40'])
    assert 'per-sample λ from' in proc.stdout
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.size == (184, 440)
        rgb = torch.tensor(list(img.convert('RGB').getdata()))
    red = (rgb[:, 0] > 200) & (rgb[:, 1] < 80) & (rgb[:, 2] < 80)
    assert int(red.sum()) > 20


def _mix_switch_for_picture(rank: int, world_size: int) -> dict:
    from launch.visualize import build_parser, mix_on_rank, switch_spec

    args = build_parser().parse_args(['--switch'])
    record = mix_on_rank(rank, world_size, 5, 8, 0, args.alpha, per_sample=True, spec=switch_spec(args))
    record['spec'] = switch_spec(args)
    return record


def test_visualize_switch_shows_the_engines_images_and_names_each_method(tmp_path):
    from PIL import Image

    from dist_cutmix import MixSpec, sample_mix
    from dist_cutmix.randomness import batch_generator
    from launch.train import MNIST_MEAN, MNIST_STD
    from launch.visualize import OUT_SWITCH, build_parser, default_out, draw_grid, panels

    assert default_out(build_parser().parse_args(['--switch'])) == OUT_SWITCH
    records = run_ranks(_mix_switch_for_picture, 2, tmp_path, deadline_s=120)
    # The reference: the draw of the global batch of 10 (rank 0's 5 images, then rank 1's), applied by hand.
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.7, switch_prob=0.5, label_smoothing=0.1)
    draw = sample_mix(spec, 10, 28, 28, per_sample=True, generator=batch_generator(8, 0, 'group', 0))
    originals = torch.cat([r['original'] for r in records])
    shown = {(p['rank'], p['index']): p for p in panels(records) if p['key'] == 'mixed'}
    seen = set()
    for g in range(10):
        rank, i = divmod(g, 5)
        y0, y1, x0, x1 = (int(v) for v in draw.boxes[g])
        w = float(draw.weights[g])
        own, partner = originals[g], originals[int(draw.indices[g])]
        expected = own.clone()
        expected[:, y0:y1, x0:x1] = (1 - w) * own[:, y0:y1, x0:x1] + w * partner[:, y0:y1, x0:x1]
        method = 'unmixed' if (y1 - y0) * (x1 - x0) == 0 or w == 0 else 'CutMix' if w == 1 else 'MixUp'
        seen.add(method)
        rec, panel = records[rank], shown[(rank, i)]
        torch.testing.assert_close(rec['mixed'][i], expected, rtol=0, atol=1e-6)
        assert torch.equal(panel['image'], (rec['mixed'][i, 0] * MNIST_STD + MNIST_MEAN).clamp(0, 1))
        assert panel['method'] == rec['method'][i] == method
        lam = 1 - w * (y1 - y0) * (x1 - x0) / 784
        if method == 'unmixed':
            assert 'unmixed, λ=1' in panel['title'] and panel['outline'] is None
        else:
            assert f'\n{method} λ={lam:.2f}\n' in panel['title']
            assert panel['outline'] == ((y0, y1, x0, x1), 'red' if method == 'CutMix' else 'tab:orange')
            p, j = divmod(int(draw.indices[g]), 5)
            assert f'← rank {p} #{j}' in panel['title']
    assert seen == {'CutMix', 'MixUp', 'unmixed'}
    png = draw_grid(records, str(tmp_path / 'switch.png'), dpi=40)
    with Image.open(png) as img:
        # figsize (2.3 * 5, 3.0 * 2 * 2) inches at 40 dpi
        assert img.format == 'PNG' and img.size == (460, 480)
        rgb = torch.tensor(list(img.convert('RGB').getdata()))
    red = (rgb[:, 0] > 200) & (rgb[:, 1] < 80) & (rgb[:, 2] < 80)
    orange = (rgb[:, 0] > 220) & (rgb[:, 1] > 100) & (rgb[:, 1] < 160) & (rgb[:, 2] < 60)
    assert int(red.sum()) > 20 and int(orange.sum()) > 20  # CutMix boxes and MixUp frames are both drawn
