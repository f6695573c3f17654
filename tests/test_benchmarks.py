"""tools/benchmarks/ on the toy at their smallest sizes, as a user runs them:
each finishes and prints its summary (the numbers they report in the docs
come from these lines)."""
import re

import pytest

from test_tools_cli import run_tool

NUMBER = r'([0-9.]+)'


@pytest.mark.parametrize('method', ['repq-vit', 'qdrop'])
def test_recon_speed_prints_the_calibration_and_final_peaks(method):
    """Any registered method (its own reconstruction, or the defaults on
    top of a calibration-only one)."""
    code, out = run_tool('tools/benchmarks/recon_speed.py', '--models', 'toy',
                         '--images', '1', '--iters', '1', '--method', method)
    assert code == 0, out
    after_calibration = float(re.search(
        rf'calibration \({method}\) on 1 images: [0-9.]+ s, peak resident '
        rf'memory so far {NUMBER} MB', out).group(1))
    units = re.findall(r'^  (\S+): [0-9.]+ s/iteration', out, re.M)
    assert units[0] == 'backbone.patch_embed' and units[-1] == 'neck', out
    final = float(re.search(rf'^peak resident memory {NUMBER} MB$', out,
                            re.M).group(1))
    assert 0 < after_calibration <= final  # a peak only grows


def test_ort_latency_fuses_the_integer_kernels():
    code, out = run_tool('tools/benchmarks/ort_latency.py', '--models', 'toy',
                         '--runs', '2')
    assert code == 0, out
    line = re.search(r'float [0-9.]+ ms, QDQ [0-9.]+ ms, ratio [0-9.]+; '
                     r'fused integer kernels (\{.*\}), DequantizeLinear '
                     r'left (\d+)', out)
    assert line, out
    assert "'MatMulIntegerToFloat'" in line.group(1)
    assert line.group(2) == '0'  # every quantized layer in a fused kernel


def test_ptq_speed_prints_its_ratios():
    code, out = run_tool('tools/benchmarks/ptq_speed.py', '--models', 'toy',
                         '--images', '1', '--repeat', '1')
    assert code == 0, out
    assert re.search(r'calibration [0-9.]+ s, float inference of the same 1 '
                     r'images [0-9.]+ s, ratio [0-9.]+', out), out


def test_cd_overhead_amortises_the_update_over_the_interval():
    code, out = run_tool('tools/benchmarks/cd_overhead.py', '--models', 'toy',
                         '--steps', '4', '--interval', '4')
    assert code == 0, out
    assert '15 matrix pairs (ffn: 5, vo: 5, qk: 5)' in out
    update, per_step = map(float, re.search(
        rf'the CD update {NUMBER} ms \(1 timed\), interval 4: {NUMBER} ms '
        'per optimizer step', out).groups())
    # both printed to 0.1 ms
    assert per_step == pytest.approx(update / 4, abs=0.07)


def test_qat_overhead_times_ofq_with_and_without_its_reparameterization():
    code, out = run_tool('tools/benchmarks/qat_overhead.py', '--models', 'toy',
                         '--steps', '2')
    assert code == 0, out
    assert re.search(r'^toy Swin Mask R-CNN \(256 px\): float [0-9]+ ms; ofq '
                     r'[0-9]+ ms, ratio [0-9.]+; ofq without query-key '
                     r'reparam [0-9]+ ms, ratio [0-9.]+$', out, re.M), out
    assert 'Swin-T' not in out  # --models toy only
