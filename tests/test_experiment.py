"""tools/analysis/experiment.py at a micro size produces a well-formed
table, JSON and plots."""
import json

from test_tools_cli import run_tool


def test_experiment_quick_micro(micro_data_root, tmp_path):
    code, out = run_tool(
        'tools/analysis/experiment.py', '--quick', '--data-root',
        micro_data_root, '--epochs', '1', '--trainings', 'baseline', 'cd',
        '--methods', 'minmax', 'dopq-vit', '--bits', '8', '4',
        '--calib-images', '2', '--stat-images', '2', '--work-dir',
        str(tmp_path), timeout=900)
    assert code == 0, out
    table = (tmp_path / 'results.md').read_text().splitlines()
    header = '| training | PTQ | float | W8A8 | W4A4 |'
    assert header in table
    rows = [line for line in table if line.startswith(('| baseline',
                                                       '| cd'))]
    # training x (2 PTQ methods + QAT), + outlier rows
    assert len(rows) == 2 * 3 + 2
    for line in rows[:6]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        assert len(cells) == 5
        if cells[1] == 'qat-ofq':  # QAT at W4A4 only (the --quick default)
            assert cells[3] == '–'
            cells = cells[:3] + cells[4:]
        for value in cells[2:]:
            box, mask = (float(v) for v in value.split(' / '))
            assert 0 <= box <= 100 and 0 <= mask <= 100
    assert [line.split('|')[2].strip() for line in rows[:6]] == \
        ['minmax', 'dopq-vit', 'qat-ofq'] * 2
    results = json.loads((tmp_path / 'results.json').read_text())
    assert set(results['metrics']) == {'baseline', 'cd'}
    assert 'dopq-vit/W4A4' in results['metrics']['cd']
    qat = results['metrics']['cd']['qat-ofq/W4A4']
    assert 0 <= qat['coco/bbox_mAP'] <= 1 and 0 <= qat['qat_oscillation'] <= 1
    for png in ('max_activation.png', 'alignment.png', 'histogram.png'):
        assert (tmp_path / png).stat().st_size > 10_000
