"""tools/analysis/experiment.py at a micro size: a well-formed table over
seeds with paired rows, JSON and plots; cached cells that a re-run reuses,
and a work dir of other settings or another code version refused."""
import json

import pytest

from test_tools_cli import assert_one_line_error, run_here, run_tool

ARGS = ('--quick', '--epochs', '1', '--seeds', '2', '--trainings', 'baseline',
        'cd', '--methods', 'minmax', '--bits', '8', '4', '--calib-images',
        '2', '--stat-images', '2', '--qat-bits',  # QAT: test_qat*.py
        '--recon-trainings', 'cd', '--recon-methods', 'qdrop',
        '--recon-iters', '2')


@pytest.mark.parametrize('option, message', [
    ('tau=2', 's2d tau must be in (0, 1], got 2'),
    ('max_rank=0', 's2d max_rank must be an integer >= 1, got 0'),
    ('taus=0.5', "s2d: unknown option(s) ['taus']; allowed: ['max_rank', "
     "'power', 'strength', 'svd_interval', 'tau']")])
def test_experiment_s2d_options_checked_before_any_work(tmp_path, option,
                                                        message):
    work_dir = tmp_path / 'work'
    code, out = run_here('tools/analysis/experiment.py', '--quick',
                         '--trainings', 's2d', '--s2d-options', option,
                         '--work-dir', str(work_dir))
    assert code == 2 and 'Traceback' not in out, out
    assert out.strip().splitlines()[-1].endswith(
        f'error: --s2d-options: {message}'), out
    assert not work_dir.exists()  # refused before anything was written


@pytest.mark.slow  # several trainings end to end (pytest -m slow)
def test_experiment_seeds_cache_and_refusals(micro_data_root, tmp_path):
    run = ('tools/analysis/experiment.py', *ARGS, '--data-root',
           micro_data_root, '--work-dir', str(tmp_path))
    code, out = run_tool(*run, timeout=1200)
    assert code == 0, out
    table = (tmp_path / 'results.md').read_text().splitlines()
    assert '| training | PTQ | float | W8A8 | W4A4 |' in table
    rows = [line for line in table if line.startswith(('| baseline',
                                                       '| cd'))]
    # baseline, cd and "cd − baseline" x minmax; then the outlier rows
    labels = [(r.split('|')[1].strip(), r.split('|')[2].strip())
              for r in rows[:3]]
    assert labels == [('baseline', 'minmax'), ('cd', 'minmax'),
                      ('cd − baseline', 'minmax')]
    for line in rows[:3]:
        cells = [c.strip() for c in line.strip('|').split('|')][2:]
        assert len(cells) == 3
        for value in cells:
            for part in value.split(' / '):
                mean, _, std = part.partition(' ± ')
                assert std, value  # two seeds: mean ± std
                assert -100 <= float(mean) <= 100 and float(std) >= 0
    # + one outlier row per training, + the reconstruction table's rows
    assert len(rows) == 3 + 2 + 2
    recon = (tmp_path / 'results.md').read_text().split(
        '## Reconstruction PTQ (2 iterations')[1].split('##')[0]
    assert [[c.strip() for c in line.split('|')[1:3]]
            for line in recon.splitlines() if line.startswith('| cd')] == [
                ['cd', 'repq-vit'], ['cd', 'qdrop']]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert len(results['metrics']['cd']) == 2  # one row per seed
    assert set(results['metrics']['cd'][1]) == {
        'float', 'minmax/W8A8', 'minmax/W4A4', 'repq-vit/W4A4',
        'qdrop/W4A4'}
    assert set(results['metrics']['baseline'][1]) == {
        'float', 'minmax/W8A8', 'minmax/W4A4'}
    qdrop = results['metrics']['cd'][0]['qdrop/W4A4']
    assert qdrop['seconds'] > 0 and qdrop['units']
    assert all(len(errors) == 2 and min(errors) >= 0
               for errors in qdrop['units'].values())
    assert 'units' not in results['metrics']['cd'][0]['repq-vit/W4A4']
    for png in ('max_activation.png', 'alignment.png', 'histogram.png'):
        assert (tmp_path / png).stat().st_size > 10_000
    # every cell is cached: a re-run trains and evaluates nothing
    code, out = run_tool(*run, timeout=300)
    assert code == 0, out
    assert 'Epoch(train)' not in out and 'calibrating' not in out
    assert json.loads((tmp_path / 'results.json').read_text())[
        'metrics'] == results['metrics']
    # the sweep's points equal to a main training reuse its cells: only
    # the W4A4 repq-vit evaluations of seed 0 are new
    code, out = run_tool(*run, '--sweep', '--cd-strengths', '0', '2',
                         '--tweo-weights', '0', timeout=600)
    assert code == 0, out
    assert 'Epoch(train)' not in out
    sweep = (tmp_path / 'results.md').read_text().split('## Strength')[1]
    assert [line.split('|')[1].strip() for line in sweep.splitlines()
            if line.startswith(('| cd@', '| tweo@'))] == [
                'cd@0', 'cd@2', 'tweo@0']
    assert (tmp_path / 'tradeoff.png').stat().st_size > 10_000
    # other settings, or results of another code version: refused
    code, out = run_tool(*run, '--lr', '0.002', timeout=300)
    assert_one_line_error(code, out, 'settings lr=0.001 (now 0.002)')
    code, out = run_tool(*run, '--s2d-options', 'tau=0.5', timeout=300)
    assert_one_line_error(code, out,
                          "settings s2d_options=None (now {'tau': 0.5})")
    code, out = run_tool(*run, '--load-from', str(tmp_path / 'no.pth'))
    assert_one_line_error(code, out, f'--load-from {tmp_path}/no.pth does '
                          'not exist')
    ckpt = tmp_path / 'baseline_s0' / 'epoch_1.pth'
    code, out = run_tool(*run, '--load-from', str(ckpt), timeout=300)
    assert_one_line_error(code, out, f"load_from=None (now '{ckpt}')")
    # fine-tuning: every training starts from the --load-from weights
    code, out = run_tool(*run[:-1], str(tmp_path / 'tuned'), '--trainings',
                         'baseline', '--seeds', '1', '--qat-bits',
                         '--load-from', str(ckpt), timeout=1200)
    assert code == 0, out
    assert f'Load checkpoint from {ckpt}' in out
    manifest = tmp_path / 'cache' / 'manifest.json'
    stored = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(stored, version='0123abc')))
    code, out = run_tool(*run, timeout=300)
    assert_one_line_error(code, out, 'code version 0123abc')


def model_cells(drop, mask_drop, kurtosis, max_abs):
    """One trained model's row and outlier stats, as results.json holds
    them (float AP 0.5; ``drop`` in AP points)."""
    row = {'float': {'coco/bbox_mAP': 0.5, 'coco/segm_mAP': 0.5},
           'repq-vit/W4A4': {'coco/bbox_mAP': 0.5 + drop / 100,
                             'coco/segm_mAP': 0.5 + mask_drop / 100},
           'minmax/W4A4': {'coco/bbox_mAP': 0.1, 'coco/segm_mAP': 0.1}}
    stat = {'stats': {'block/output': {'max_abs': max_abs,
                                       'kurtosis': kurtosis}},
            'alignment': {'block.pair': {'mean': 1.0}}}
    return row, stat


def test_experiment_report_from_results_json(tmp_path):
    """``--report-from`` writes the report of a finished run again, with
    the correlation of the W4A4 drop and the outlier summary over the
    distinct trained models; hand-computed: kurtosis 10, 20, 30, 40 against
    box drops -1, -2, -4, -3: Pearson r = -40 / sqrt(500 * 5) = -0.80, and
    the ranks (0, 1, 2, 3) against (3, 2, 0, 1) give rho = -4 / 5 = -0.80;
    max abs 5, 5, 7, 9 (a tie: ranks 0.5, 0.5, 2, 3): r = -5 / sqrt(11 *
    5) = -0.67, rho = -3.5 / sqrt(4.5 * 5) = -0.74; alignment constant: no
    correlation. The sweep point equal to the baseline (``cd@0``) is the
    baseline's model and is not counted again."""
    models = [model_cells(-1, 1, 10, 5), model_cells(-2, 2, 20, 5),
              model_cells(-4, 4, 30, 7), model_cells(-3, 3, 40, 9)]
    args = dict(epochs=2, lr=1e-3, seeds=2, calib_images=16, val_images=64,
                bits=[4], methods=['repq-vit'], qat_bits=[],
                qat_method='ofq', stat_images=8, recon_trainings=[],
                recon_bits=[4], recon_methods=['qdrop'], recon_iters=500)
    results = dict(
        args=args, version='0123abc', command='--seeds 2',
        metrics={'baseline': [models[0][0], models[1][0]],
                 'cd': [models[2][0], models[3][0]]},
        outliers={'baseline': [models[0][1], models[1][1]],
                  'cd': [models[2][1], models[3][1]]},
        sweep={'cd@0': dict(zip(('metrics', 'outliers'),
                                model_cells(50, 50, 1000, 1000)))})
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    path = run_dir / 'results.json'
    path.write_text(json.dumps(results))
    code, out = run_here('tools/analysis/experiment.py', '--report-from',
                         str(path), '--work-dir', str(tmp_path / 'again'))
    assert code == 0, out
    report = (tmp_path / 'again' / 'results.md').read_text()
    assert 'code version 0123abc (`python tools/analysis/experiment.py ' \
        '--seeds 2`)' in report
    assert '| cd − baseline | repq-vit |' in report
    section = report.split('## What the repq-vit/W4A4 drop follows (4 '
                           'trained models)')[1]
    assert '| largest kurtosis | -0.80 / -0.80 | +0.80 / +0.80 |' in section
    assert '| largest max abs | -0.67 / -0.74 | +0.67 / +0.74 |' in section
    assert '| mean alignment | – | – |' in section
    assert '| cd@0 | 50.0 / 50.0 | 100.0 / 100.0 | 10.0 / 10.0 | ' \
        '1000.00 | 1000.00 | 1.00 |' in report  # the sweep table keeps it
    # the run's own report is not overwritten; a file of another kind
    code, out = run_here('tools/analysis/experiment.py', '--report-from',
                         str(path), '--work-dir', str(run_dir))
    assert_one_line_error(code, out, "holds the run's own results.md")
    del results['args']['recon_trainings']  # an older version's run
    path.write_text(json.dumps(results))
    code, out = run_here('tools/analysis/experiment.py', '--report-from',
                         str(path), '--work-dir', str(tmp_path / 'again'))
    assert_one_line_error(code, out, 'written by a version of this tool '
                          'without --recon-trainings')
    (tmp_path / 'other.json').write_text('{"metrics": {}}')
    code, out = run_here('tools/analysis/experiment.py', '--report-from',
                         str(tmp_path / 'other.json'), '--work-dir',
                         str(tmp_path / 'again'))
    assert_one_line_error(code, out, 'not a results.json of this tool')
