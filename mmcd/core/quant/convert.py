"""Turn a float model into a fake-quantized one and calibrate it.

What is quantized by default, as RepQ-ViT does on COCO: every ``Linear`` and
``Conv2d`` (weights per output channel, inputs per tensor) and both attention
matmuls, in backbone, neck and heads; the patch embedding's input at 8 bits.
``ConvTranspose2d``, norms, softmax and residual additions stay in floating
point (the ``tensorrt`` profile quantizes the additions' residual input:
residual.py). ``scope='backbone'`` restricts quantization to the backbone;
``skip`` patterns (regular expressions searched in module names) leave
layers out.

Methods (methods.py): ``minmax`` (min-max ranges, uniform post-softmax),
``repq-vit`` (RepQ-ViT: LayerNorm scale reparameterization with its mean
target, quantile/MSE search for activations and weights, log-sqrt2
post-softmax with a calibrated scale) and ``dopq-vit`` (the same with TanQ,
our formulation, post-softmax), ``qdrop`` and ``aphq-vit``. Calibration
follows RepQ-ViT's code: one pass over the calibration images, as one batch,
with quantization on, each quantizer calibrating on the first tensor it sees
(quantizers.py); the post-LayerNorm inputs are quantized per channel in that
pass and reparameterized after it. ``aphq-vit`` runs that pass in float and
a second one for the reparameterized inputs, as APHQ-ViT's code
(:func:`calibrate`). A module called more than once per pass (an RPN head
over the FPN levels) is calibrated on its first call (RepQ-ViT) or on all
its calls in extra passes (``QuantMethod.shared_calls``). Pure PyTorch.
"""
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..architectures import first_layer_pattern
from ..errors import ConfigError
from .methods import QuantMethod, get_method
from .profiles import DEFAULT_PROFILE, DEPLOY_PROFILES, DeployProfile
from .modules import (FLOAT_ATTENTION_KERNELS, QUANTIZED_MODULES,
                      QuantConv2d, QuantizedModule, QuantLinear, QuantMatMul)
from .quantizers import (RANGE_SEARCHES, FakeQuantizer, UniformQuantizer,
                         check_bits)
from .mlp_reconstruction import use_relu
from .reconstruction import ReconstructionConfig
from .reparam import find_norm_linear_pairs, reparameterize, target_params

ATTENTION_NAME = re.compile(r'attention|msa', re.IGNORECASE)


@dataclass(frozen=True)
class LayerBits:
    """Bits of the quantized layers whose module name matches ``pattern``
    (a regular expression, ``re.search``): ``w_bits`` of their weights,
    ``a_bits`` of their inputs (attention modules: of their matmul
    operands); None keeps the config's."""
    pattern: str
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None

    @classmethod
    def from_dict(cls, rule) -> 'LayerBits':
        if isinstance(rule, LayerBits):
            return rule
        rule = dict(rule)
        unknown = set(rule) - {'pattern', 'w_bits', 'a_bits'}
        if unknown or 'pattern' not in rule:
            raise ValueError(
                'layer_bits: each rule is dict(pattern=REGEX, w_bits=N, '
                f'a_bits=M), got {rule}')
        if rule.get('w_bits') is None and rule.get('a_bits') is None:
            raise ValueError(f'layer_bits rule {rule} sets neither w_bits '
                             'nor a_bits')
        try:
            re.compile(rule['pattern'])
        except re.error as err:
            raise ValueError(f'layer_bits pattern {rule["pattern"]!r} is not '
                             f'a regular expression: {err}') from None
        for key in ('w_bits', 'a_bits'):
            if rule.get(key) is not None:
                try:
                    check_bits(rule[key])
                except ValueError as err:
                    raise ValueError(f'layer_bits rule {rule["pattern"]!r}: '
                                     f'{key}: {err}') from None
        return cls(**rule)


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        w_bits, a_bits: 2..8.
        method: a registered method (``QUANT_METHODS``, methods.py).
        weight_search: override the method's weight range search
            (``'quantile'``, RepQ-ViT's; ``'clip-ratio'``, ours; or
            ``'minmax'``); None keeps the method's.
        scope: ``'all'`` or ``'backbone'`` (modules under ``backbone.``).
        skip: regexes of module names left in floating point.
        first_layer_bits: input bits of modules matching
            ``first_layer_pattern`` (default None: the first layers of the
            registered architecture specs, the patch embedding).
        layer_bits: mixed precision, ``[dict(pattern=REGEX, w_bits=8,
            a_bits=8), ...]`` (:class:`LayerBits`): the first rule whose
            pattern a layer's name matches sets its bits (an ``a_bits``
            there overrides ``first_layer_bits``); a rule matching no
            quantized layer is an error at conversion.
        reconstruction: options of block reconstruction after calibration
            (a dict of :class:`~mmcd.core.quant.reconstruction.
            ReconstructionConfig`: ``iters``, ``batch_size``,
            ``drop_prob``, ``loss``, ``mlp``...), for any method: they
            override the method's own reconstruction (``qdrop``,
            ``aphq-vit``) or add one (None: the method's, if any).
        profile: the runtime the model is quantized for, a registered
            :class:`~mmcd.core.quant.profiles.DeployProfile`
            (``'onnxruntime'``, the default: the method as published;
            ``'tensorrt'``: symmetric INT8, profiles.py).
    """
    w_bits: int = 4
    a_bits: int = 4
    method: str = 'repq-vit'
    scope: str = 'all'
    skip: Sequence[str] = field(default_factory=tuple)
    first_layer_bits: int = 8
    first_layer_pattern: Optional[str] = None
    weight_search: Optional[str] = None
    layer_bits: Sequence = field(default_factory=tuple)
    reconstruction: Optional[Dict] = None
    profile: str = DEFAULT_PROFILE

    def __post_init__(self):
        self.layer_bits = tuple(LayerBits.from_dict(rule)
                                for rule in self.layer_bits)
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        check_bits(self.first_layer_bits)
        get_method(self.method)  # registered?
        if self.weight_search is not None:
            RANGE_SEARCHES.get(self.weight_search)  # registered?
        if self.reconstruction is not None:
            self.reconstruction_config()  # validates the options
        if self.scope not in ('all', 'backbone'):
            raise ValueError("scope must be 'all' or 'backbone', got "
                             f'{self.scope!r}')
        if not self.layer_bits:  # else: per layer, at conversion
            self.deploy_profile.check_bits(
                {f'w_bits={self.w_bits}': [self.w_bits],
                 f'a_bits={self.a_bits}': [self.a_bits]})

    @property
    def deploy_profile(self) -> DeployProfile:
        return DEPLOY_PROFILES.get(self.profile)

    @property
    def resolved_method(self) -> QuantMethod:
        """The registered method, with ``weight_search`` and the
        profile applied."""
        method = get_method(self.method)
        if self.weight_search is not None:
            method = replace(method,
                             name=f'{method.name}+{self.weight_search}',
                             weight_search=self.weight_search)
        return self.deploy_profile.apply(method)

    def reconstruction_config(self) -> Optional[ReconstructionConfig]:
        """The reconstruction after calibration: the method's, with
        ``reconstruction``'s options applied (None: calibration only);
        unknown options fail naming the allowed ones."""
        base = get_method(self.method).reconstruction
        if self.reconstruction is None:
            return base
        options = dict(self.reconstruction)
        allowed = set(ReconstructionConfig.__dataclass_fields__)
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f'reconstruction: unknown option(s) {unknown}; '
                             f'allowed: {sorted(allowed)}')
        if 'beta' in options:
            options['beta'] = tuple(options['beta'])
        return replace(base or ReconstructionConfig(), **options)

    def rule_for(self, name: str) -> Optional[LayerBits]:
        """The first ``layer_bits`` rule matching module ``name``."""
        return next((rule for rule in self.layer_bits
                     if re.search(rule.pattern, name)), None)


def _is_first_layer(name: str, cfg: QuantConfig) -> bool:
    return re.search(cfg.first_layer_pattern or first_layer_pattern(),
                     name) is not None


def layer_bits_of(name: str, cfg: QuantConfig):
    """``(w_bits, a_bits, rule)`` of the layer called ``name``: the
    config's bits, the first layers' input bits, then the first matching
    ``layer_bits`` rule (None when none matches)."""
    rule = cfg.rule_for(name)
    w_bits, a_bits = cfg.w_bits, cfg.a_bits
    if _is_first_layer(name, cfg):
        a_bits = cfg.first_layer_bits
    if rule is not None:
        w_bits = w_bits if rule.w_bits is None else rule.w_bits
        a_bits = a_bits if rule.a_bits is None else rule.a_bits
    return w_bits, a_bits, rule


#: the ``why`` of a :data:`FLOAT_ATTENTION_KERNELS` row of the plan
FLOAT_KERNEL = 'float kernel: '


def precision_plan(model: nn.Module, cfg: QuantConfig) -> List[Dict]:
    """What :func:`quantize_model` made of each layer of the converted
    ``model``: one row per module holding quantizers (``name``, ``kind``,
    ``quantized``, ``w_bits``, ``a_bits``: read off its quantizers, None
    where it has no such operand, e.g. a matmul's weight) and per weighted
    layer left in float (``quantized`` False, bits None), with
    ``why``: ``'default'``, ``'first layer'``, ``"layer_bits 'REGEX'"``,
    ``"skip 'REGEX'"``, ``"scope 'backbone'"`` or ``'not quantized
    (KIND)'``; an attention module of :data:`FLOAT_ATTENTION_KERNELS` is a
    row of its own (``'float kernel: WHY'``: its Linears have theirs)."""
    rows = []
    for name, module in model.named_modules():
        quantizers = {key: child for key, child in module.named_children()
                      if isinstance(child, FakeQuantizer)}
        if quantizers:
            weight = quantizers.pop('weight_quantizer', None)
            a_bits = sorted({q.bits for q in quantizers.values()})
            rule = cfg.rule_for(name)
            why = (f"layer_bits '{rule.pattern}'" if rule is not None else
                   'first layer' if _is_first_layer(name, cfg) else
                   'default')
            rows.append(dict(
                name=name, kind=type(module).__name__, quantized=True,
                w_bits=None if weight is None else weight.bits,
                a_bits=a_bits[0] if len(a_bits) == 1 else a_bits or None,
                why=why))
        elif (kernel := FLOAT_ATTENTION_KERNELS.find(module)) is not None:
            rows.append(dict(name=name, kind=type(module).__name__,
                             quantized=False, w_bits=None, a_bits=None,
                             why=FLOAT_KERNEL + kernel))
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d,
                                 nn.Conv1d, nn.Conv3d)) and \
                not isinstance(module, QuantizedModule):
            skip = next((p for p in cfg.skip if re.search(p, name)), None)
            why = (f"skip '{skip}'" if skip is not None else
                   f"scope '{cfg.scope}'" if not _in_scope(name, cfg) else
                   f'not quantized ({type(module).__name__})')
            rows.append(dict(name=name, kind=type(module).__name__,
                             quantized=False, w_bits=None, a_bits=None,
                             why=why))
    return rows


def format_precision_plan(rows: Sequence[Dict]) -> str:
    """:func:`precision_plan` as a compact table: one line per (weight
    bits, input bits, kind, why), with the layer count and the first
    layer."""
    def bits(row, key):
        if not row['quantized']:
            return 'float'
        return '-' if row[key] is None else str(row[key])

    groups: Dict = {}
    for row in rows:
        key = (bits(row, 'w_bits'), bits(row, 'a_bits'), row['kind'],
               row['why'])
        groups.setdefault(key, []).append(row['name'])
    quantized = sum(row['quantized'] for row in rows)
    kernels = sum(row['why'].startswith(FLOAT_KERNEL) for row in rows)
    kind_width = max([len(key[2]) for key in groups] + [4]) + 2
    why_width = max([len(key[3]) for key in groups] + [3]) + 2
    lines = [f'{quantized} quantized layer(s), '
             f'{len(rows) - quantized - kernels} weighted layer(s) in float'
             + (f', {kernels} attention kernel(s) in float' if kernels
                else ''),
             f'{"layers":>6}  {"weights":>7}  {"inputs":>6}  '
             f'{"kind":<{kind_width}}{"why":<{why_width}}first of them']
    for (w_bits, a_bits, kind, why), names in groups.items():
        lines.append(f'{len(names):>6}  {w_bits:>7}  {a_bits:>6}  '
                     f'{kind:<{kind_width}}{why:<{why_width}}{names[0]}')
    return '\n'.join(lines)


def _in_scope(name: str, cfg: QuantConfig) -> bool:
    if cfg.scope == 'backbone' and not name.startswith('backbone.'):
        return False
    return not any(re.search(p, name) for p in cfg.skip)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace, in place, the layers of ``model`` by quantized ones (all
    quantizers start in the ``'fp'`` state: the output is unchanged).

    Raises ``ValueError`` on a model that is already quantized (quantizers
    never stack) and on attention modules mmcd cannot quantize.
    """
    if fake_quantizers(model):
        raise ValueError('model is already quantized; quantize a float copy')
    method = cfg.resolved_method
    matched = set()  # the layer_bits rules that picked some layer

    def convert_children(parent: nn.Module, prefix: str, convert) -> None:
        for attr, child in list(parent.named_children()):
            name = prefix + attr
            twin_of = QUANTIZED_MODULES.find(child)
            if twin_of is not None and _in_scope(name, cfg) and \
                    not isinstance(child, (QuantizedModule, FakeQuantizer)):
                child = convert(parent, attr, child, name, twin_of)
            convert_children(child, name + '.', convert)

    def plan(parent, attr, child, name, twin_of):
        planned[name] = layer_bits_of(name, cfg)[:2]
        return child

    def replace_by_twin(parent, attr, child, name, twin_of):
        w_bits, a_bits, rule = layer_bits_of(name, cfg)
        twin = twin_of(child, w_bits, a_bits, method)
        if twin is not child:  # a factory may leave a module as it is
            setattr(parent, attr, twin)
            if rule is not None:
                matched.add(rule)
        return twin

    planned = {}  # the profile's check sees every layer before any change
    convert_children(model, '', plan)
    cfg.deploy_profile.check_bits(planned)
    convert_children(model, '', replace_by_twin)
    recon = cfg.reconstruction_config()
    if recon is not None and recon.mlp:
        use_relu(model)  # MLP reconstruction's ReLU
    for name, module in model.named_modules():
        kind = type(module).__name__
        if not name or not ATTENTION_NAME.search(kind):
            continue
        inside = [(f'{name}.{n}' if n else name, m)
                  for n, m in module.named_modules()]
        covered = any(isinstance(m, QuantMatMul) for _, m in inside) or \
            not all(_in_scope(n, cfg) for n, _ in inside) or \
            FLOAT_ATTENTION_KERNELS.find(module) is not None
        if not covered:
            raise ValueError(
                f'cannot quantize attention module {name} ({kind}): its '
                'matmuls are computed inline. Register a quantized twin of '
                f'{kind} in mmcd.core.quant.QUANTIZED_MODULES (registered: '
                f'{", ".join(QUANTIZED_MODULES.names())}; '
                'docs/en/extending.md), or write its matmuls with '
                'mmcd.core.quant.MatMul; skip it with '
                f"skip=[r'{re.escape(name)}'] or scope='backbone'")
    unmatched = [rule.pattern for rule in cfg.layer_bits
                 if rule not in matched]
    if unmatched:
        examples = [n for n, m in model.named_modules()
                    if isinstance(m, (QuantLinear, QuantConv2d))][:3]
        raise ConfigError(
            f'layer_bits pattern(s) {unmatched} match no quantized layer '
            f'(module names such as {", ".join(examples)}; scope '
            f'{cfg.scope!r}, skip {list(cfg.skip)})')
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            module.layer_name = name
    return model


def fake_quantizers(model: nn.Module) -> List[FakeQuantizer]:
    """Every quantizer of ``model``."""
    return [m for m in model.modules() if isinstance(m, FakeQuantizer)]


def activation_quantizers(model: nn.Module) -> List[FakeQuantizer]:
    """The quantizers of ``model`` that quantize activations: all but the
    weight quantizers of its quantized layers (and QAT's query-key
    products)."""
    weights = {id(m.weight_quantizer) for m in _weight_layers(model)}
    return [q for q in fake_quantizers(model) if id(q) not in weights]


def layer_quantizers(model: nn.Module) -> Dict[str, List[FakeQuantizer]]:
    """The quantized layers of ``model`` by module name, each with the
    quantizers it holds directly: a quantized Linear/Conv2d its weight and
    input quantizers, an attention matmul its two operand quantizers (the
    units a sensitivity analysis switches on and off)."""
    layers: Dict[str, List[FakeQuantizer]] = {}
    for name, module in model.named_modules():
        own = [m for m in module.children() if isinstance(m, FakeQuantizer)]
        if own and not isinstance(module, FakeQuantizer):
            layers[name] = own
    return layers


def set_quant_state(model: nn.Module, state: str) -> None:
    for q in fake_quantizers(model):
        q.set_state(state)


def _weight_layers(model: nn.Module) -> List[nn.Module]:
    """Quantized Linear / Conv2d, and QAT's query-key products."""
    return [m for m in model.modules() if hasattr(m, 'finalize_weight')]


@torch.no_grad()
def calibrate(model: nn.Module, cfg: QuantConfig,
              run_calibration: Callable[[], None]) -> dict:
    """Calibrate a model converted by :func:`quantize_model` and switch it
    to quantized inference, as RepQ-ViT's code does (APHQ-ViT's where the
    method says so).

    1. Weights are quantized (their own range search).
    2. ``run_calibration`` runs the model (eval mode) **once** on the
       calibration images, as one batch: every activation quantizer
       calibrates on the first tensor it sees and quantizes from then on,
       so each layer sees the inputs of the already-quantized layers before
       it; a method with ``calibration_inputs='float'`` runs this pass in
       float (weights and activations), so each layer is calibrated on the
       float model's inputs (APHQ-ViT's calibrator, which sets every
       calibrated layer back to float before the next). For a
       reparameterized method the post-LayerNorm inputs are quantized per
       channel in this pass (with the method's activation search).
    3. Reparameterization (methods with a target): per-channel grids ->
       target, folded into LayerNorm and Linear, target kept; the Linear's
       weight is quantized again. With ``search_after_reparam`` a second
       pass (of the same kind) searches those inputs again, per tensor, on
       the reparameterized values instead of keeping the target
       (APHQ-ViT).

    4. A quantizer called more than once in the pass (a module shared by
       several inputs: mmdet's RPN head runs on every FPN level) calibrated
       on its first call, as RepQ-ViT's code does; with the method's
       ``shared_calls='all'`` it is calibrated again on all its calls at
       once (:func:`_calibrate_on_every_call`; APHQ-ViT's calibrator
       gathers every call of a layer).

    A quantizer the pass never reached stays in float; their names are in
    the summary (``unreached``), which the caller should report, as
    ``first_call_only`` (quantizers of a shared attention matmul, whose
    joint search sees one call) and ``unsettled``
    (:func:`_calibrate_on_every_call`). Returns the summary.
    """
    model.eval()
    method = cfg.resolved_method
    layers = _weight_layers(model)
    for layer in layers:
        layer.finalize_weight()
    modules = dict(model.named_modules())
    per_channel = []  # (norm, linear, the linear's own input quantizer)
    if method.reparameterize:
        for norm_name, lin_name in find_norm_linear_pairs(model):
            linear = modules[lin_name]
            if not isinstance(linear, QuantLinear):
                continue
            own = linear.input_quantizer
            linear.input_quantizer = UniformQuantizer(
                own.bits, -1, method.act_search, keep_zero=True,
                symmetric=own.symmetric)
            linear.input_quantizer.layer_name = own.layer_name
            per_channel.append((modules[norm_name], linear, own))
    act_quantizers = activation_quantizers(model)
    float_inputs = method.calibration_inputs == 'float'
    every_call = method.shared_calls == 'all'
    try:
        for q in act_quantizers if every_call else ():
            q.calls = 0
        try:
            _calibration_pass(model, layers, act_quantizers,
                              run_calibration, float_inputs)
        finally:
            shared = [q for q in act_quantizers if (q.calls or 0) > 1]
            for q in act_quantizers:
                q.calls = None
        joint = {id(q) for m in model.modules()
                 if isinstance(m, QuantMatMul) and m.search is not None
                 for q in (m.quantizer_a, m.quantizer_b)}
        first_call_only = [q.layer_name for q in shared if id(q) in joint]
        shared = [q for q in shared if id(q) not in joint]
        passes, unsettled = _calibrate_on_every_call(
            model, layers, shared, run_calibration, float_inputs)
    except BaseException:
        for _, linear, own in per_channel:
            linear.input_quantizer = own
        raise
    unreached = []
    for q in act_quantizers:
        if q.state == 'calib':
            unreached.append(q.layer_name)
            q.state = 'fp'
    reparameterized = []  # the Linears' own input quantizers
    for norm, linear, own in per_channel:
        grid, linear.input_quantizer = linear.input_quantizer, own
        if grid.calibrated:  # else: unreached, left in float
            params = grid.channel_params()
            reparameterize(norm, linear, *params, target=target_params(
                *params, integer=method.integer_target))
            linear.finalize_weight()
            reparameterized.append(own)
    if method.search_after_reparam and reparameterized:
        _calibration_pass(model, layers, reparameterized, run_calibration,
                          float_inputs)
        for q in reparameterized:  # unreached now: the target stays
            q.state = 'quant'
    return dict(method=method.name, layers=len(layers),
                reparameterized=len(reparameterized),
                act_quantizers=len(act_quantizers),
                on_every_call=len(shared), extra_passes=passes,
                unreached=unreached, first_call_only=first_call_only,
                unsettled=unsettled)


def _calibrate_on_every_call(model: nn.Module, layers: List[nn.Module],
                             shared: List[FakeQuantizer],
                             run_calibration: Callable[[], None],
                             float_inputs: bool, max_passes: int = 4):
    """Calibrate each of ``shared`` (quantizers called more than once per
    pass) on the inputs of all its calls at once
    (:meth:`~.quantizers.FakeQuantizer.calibrate_all`), gathered in a pass
    of the same kind as the calibration's (``float_inputs``: everything in
    float, so one pass gives every shared quantizer its float inputs, as
    APHQ-ViT's calibrator). With quantized inputs a shared quantizer's
    inputs may come through another one (an RPN head's conv feeds its
    classifier, both shared): the pass is repeated until no parameter
    changes, at most ``max_passes`` times (a chain of ``d`` shared
    quantizers settles in ``d`` passes and one more confirms it). Returns
    the number of passes and the names of quantizers still changing in the
    last one."""
    if not shared:
        return 0, []
    for done in range(1, max_passes + 1):
        before = [_params_of(q) for q in shared]
        for q in shared:
            q.gathered = []
        try:
            _calibration_pass(model, layers, [], run_calibration,
                              float_inputs)
            for q in shared:
                q.calibrate_all(q.gathered)
        finally:
            for q in shared:
                q.gathered = None
        changed = [q.layer_name for q, old in zip(shared, before)
                   if not _same_params(old, _params_of(q))]
        if float_inputs or not changed:
            return done, []
    return max_passes, changed


def _params_of(quantizer: FakeQuantizer) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in quantizer.state_dict().items()}


def _same_params(a: Dict[str, torch.Tensor],
                 b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _calibration_pass(model: nn.Module, layers: List[nn.Module],
                      quantizers: List[FakeQuantizer],
                      run_calibration: Callable[[], None],
                      float_inputs: bool) -> None:
    """``run_calibration`` with ``quantizers`` calibrating on the first
    tensor each sees; ``float_inputs``: every quantizer of the model passes
    floats through during the run, the weights included (each layer then
    sees the float model's inputs). On an error the model is left in
    float."""
    for q in quantizers:
        q.set_state('calib')
    everything = fake_quantizers(model) if float_inputs else []
    weights = [layer.weight_quantizer for layer in layers] \
        if float_inputs else []
    for q in everything:
        q.passes_float = True
    for q in weights:
        q.state = 'fp'
    try:
        run_calibration()
    except BaseException:
        set_quant_state(model, 'fp')
        raise
    finally:
        for q in everything:
            q.passes_float = False
    for q in weights:
        q.state = 'quant'
