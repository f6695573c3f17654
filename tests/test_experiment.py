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
