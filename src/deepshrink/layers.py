"""The weights a stage can compress, and choosing them by name pattern.

The unit every stage works on is one weight tensor (a `Weight`): the `weight` of a Linear,
convolution (1-3-D, transposed too) or Embedding, each input-to-hidden and hidden-to-hidden
matrix of an LSTM, GRU or RNN (every layer and direction) and of their cells, the input
projection of a MultiheadAttention (its output projection is a Linear, so a Weight of its own),
and the own `weight` Parameter of two or more dimensions of any other module (a user's layer,
Hugging Face's Conv1D, a Bilinear): pruning and sharing change values, not what a module does
with them. A module's `weight` is named by the module ("fc1"); a module with several matrices
names each by its parameter ("lstm.weight_hh_l0", "encoder.layers.0.self_attn.in_proj_weight").
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from deepshrink.errors import ConfigError, ModelError, UnsupportedLayerError

# Modules whose one compressible tensor is `weight`. _ConvNd covers Conv1d/2d/3d and
# ConvTranspose1d/2d/3d.
SINGLE_WEIGHT_MODULES = (nn.Linear, _ConvNd, nn.Embedding, nn.EmbeddingBag)
# Modules whose forward reads their children's weights as tensors (torch's fused attention and
# transformer paths) instead of calling them: a child's forward (and its hooks) never runs.
READS_CHILD_WEIGHTS = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)
SUPPORTED_TYPES = (
    "Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, EmbeddingBag, LSTM, GRU, RNN (and their cells), "
    "MultiheadAttention, and any other module's own `weight` parameter of two or more dimensions"
)

# An RNN's weight matrices (torch.nn.RNNBase): weight_ih_l0, weight_hh_l1_reverse, ...; its
# biases and LSTM projections (weight_hr_l*) are left alone.
_RECURRENT_WEIGHT = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


# The paper's widths, for both the codebook bits and the relative index bits: 8 for
# convolutions, 5 for fully connected layers (Han et al. 2016, Section 3 and Tables 2-3).
# Recurrent and attention matrices are fully connected layers, so 5.
PAPER_CONV_BITS = 8
PAPER_FC_BITS = 5


def _join(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


def _weight_name(module_name: str, tensor: str) -> str:
    """A weight's name: the module, or the module's parameter when the module holds several
    (recurrent and attention modules, whose matrices are never called `weight`)."""
    if tensor == "weight":
        return module_name
    return _join(module_name, tensor)


@dataclass(frozen=True)
class Holder:
    """Another module that holds a Weight's tensor as its own parameter (tied weights)."""

    module_name: str
    module: nn.Module
    tensor: str

    @property
    def name(self) -> str:
        """Its name as a weight of its own would have."""
        return _weight_name(self.module_name, self.tensor)

    @property
    def key(self) -> str:
        """Its key in a plain state_dict."""
        return _join(self.module_name, self.tensor)


@dataclass(frozen=True, eq=False)
class Weight:
    """One compressible weight: the parameter `tensor` of `module`, which the model calls `module_name`.

    Every parametrization (pruning mask, weight sharing) is registered on this tensor of this
    module, so a stage never needs to know which kind of layer holds it. Tied weights (a language
    model's output layer reading its embedding's matrix) are one Weight, held first by `module`
    and also by each of `aliases`: a parametrization is registered, one instance, on every
    holder, so all of them compute with the same pruned or shared tensor and train one Parameter.
    """

    module_name: str
    module: nn.Module
    tensor: str = "weight"
    aliases: tuple[Holder, ...] = ()

    @property
    def name(self) -> str:
        """How recipes, stages and reports name it: the module, or the module's parameter when
        the module holds several weights."""
        return _weight_name(self.module_name, self.tensor)

    @property
    def alias_keys(self) -> list[str]:
        """The state_dict keys of the other holders of a tied weight ([] when untied)."""
        return [alias.key for alias in self.aliases]

    @property
    def key(self) -> str:
        """Its key in a plain state_dict (and in a .dcz file)."""
        return _join(self.module_name, self.tensor)

    @property
    def value(self) -> torch.Tensor:
        """The weight as the module computes with it (after any parametrization)."""
        return getattr(self.module, self.tensor)

    @property
    def is_convolution(self) -> bool:
        """Whether the weight belongs to a convolution (of any dimension, transposed or not)."""
        return isinstance(self.module, _ConvNd)

    @property
    def kind(self) -> str:
        """The holding module's type, for reports ("Linear", "LSTM", ...)."""
        return type(self.module).__name__

    def parametrizations(self) -> list[nn.Module]:
        """The parametrizations registered on this tensor, in order (none: []).

        Returns:
            The parametrization modules.
        """
        if not parametrize.is_parametrized(self.module, self.tensor):
            return []
        return list(self.module.parametrizations[self.tensor])

    def original(self) -> nn.Parameter:
        """The trainable Parameter behind the weight, parametrized or not.

        Returns:
            The Parameter.
        """
        if parametrize.is_parametrized(self.module, self.tensor):
            return self.module.parametrizations[self.tensor].original
        return getattr(self.module, self.tensor)

    def register(self, parametrization: nn.Module, *, unsafe: bool = False) -> None:
        """Register a parametrization on this tensor (after any already there).

        Args:
            parametrization: the module (a PruningMask, SharedWeights, ...).
            unsafe: skip torch's shape and dtype checks of the parametrization's output.
        """
        # The one instance on every holder of a tied weight: its mask or codebook is theirs too,
        # and each holder's list keeps the same Parameter as its `original`.
        for module, tensor in self._holders():
            parametrize.register_parametrization(module, tensor, parametrization, unsafe=unsafe)

    def remove_parametrizations(self, *, leave_parametrized: bool = True) -> None:
        """Remove every parametrization of this tensor (from every holder of a tied weight).

        Args:
            leave_parametrized: keep the current (masked, shared) values as the plain weight; else
                the original weight returns.
        """
        # torch writes the parametrized value into the same Parameter (set_), so the holders
        # stay tied: the first removal stores it, the others store the same values again.
        for module, tensor in self._holders():
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=leave_parametrized)

    def _holders(self) -> list[tuple[nn.Module, str]]:
        return [(self.module, self.tensor)] + [(alias.module, alias.tensor) for alias in self.aliases]


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's, DataParallel's and DistributedDataParallel's wrappers
    (itself when it is not wrapped): what a file holds and loads into, with the model's own
    keys (no `_orig_mod.` or `module.` in front), and what retraining runs eagerly, as
    parametrizations need.

    Args:
        model: a module, wrapped or not.

    Returns:
        The innermost module.
    """
    while True:
        inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _identity(module: nn.Module, tensor: str) -> int:
    """Which tensor a module's `tensor` is, parametrized or not: tied holders give the same."""
    if parametrize.is_parametrized(module, tensor):
        parametrizations = module.parametrizations[tensor]
        # A parametrization over several tensors (weight_norm's g and v) ties nothing we know of.
        return id(parametrizations.original) if parametrizations.is_tensor else id(parametrizations)
    return id(getattr(module, tensor))


def as_weight(layer: Weight | nn.Module) -> Weight:
    """`layer` as a Weight: a Weight as it is; a Linear, convolution or Embedding as its `weight`.

    Args:
        layer: a Weight or a single-weight module.

    Returns:
        The Weight.

    Raises:
        UnsupportedLayerError: a module that holds no single compressible weight (an LSTM
            holds several: choose one with compressible_weights).
    """
    if isinstance(layer, Weight):
        return layer
    if isinstance(layer, SINGLE_WEIGHT_MODULES) or _own_weight(layer):
        return Weight("", layer, "weight")
    raise UnsupportedLayerError(
        f"{type(layer).__name__} is not a layer with one compressible weight; pass a Weight "
        "(deepshrink.layers.compressible_weights names each of a model's weights)"
    )


def called_by_its_parents(model: nn.Module, module_name: str) -> bool:
    """Whether the module `module_name` of `model` runs its own forward: no ancestor reads its
    weights as tensors instead (READS_CHILD_WEIGHTS), so its hooks see every call.

    Args:
        model: the model.
        module_name: a submodule's name ("" for the model itself).

    Returns:
        False inside attention and transformer modules, True elsewhere.
    """
    parts = module_name.split(".") if module_name else []
    ancestors = (model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts)))
    return not any(isinstance(ancestor, READS_CHILD_WEIGHTS) for ancestor in ancestors)


def paper_default_bits(weight: Weight) -> int:
    """The paper's default width for `weight`: 8 bits for convolutions, 5 for the others.

    Args:
        weight: the weight.

    Returns:
        The width in bits.
    """
    return PAPER_CONV_BITS if weight.is_convolution else PAPER_FC_BITS


def _own_weight(module: nn.Module) -> bool:
    """Whether a module of a type we do not know (a user's own layer, Hugging Face's Conv1D, a
    Bilinear) holds a floating `weight` Parameter of two or more dimensions: a matrix or kernel
    it computes with, which pruning and sharing can compress whatever the module does with it.
    One-dimensional weights (normalisation scales, PReLU slopes) are left alone."""
    if isinstance(module, parametrize.ParametrizationList):
        return False
    if parametrize.is_parametrized(module, "weight"):
        parametrizations = module.parametrizations["weight"]
        value = parametrizations.original if parametrizations.is_tensor else None
    else:
        # TorchScript's parameter table (OrderedDictWrapper) has no get.
        value = module._parameters["weight"] if "weight" in module._parameters else None  # noqa: SIM401
    if not isinstance(value, torch.Tensor) or nn.parameter.is_lazy(value):  # lazy: check_weights names it
        return False
    return value.dim() >= 2 and value.is_floating_point()


def _weights_of(module_name: str, module: nn.Module) -> list[Weight]:
    if isinstance(module, SINGLE_WEIGHT_MODULES):
        return [Weight(module_name, module, "weight")]
    if isinstance(module, nn.RNNBase):
        return [
            Weight(module_name, module, tensor)
            for tensor in module._flat_weights_names
            if _RECURRENT_WEIGHT.match(tensor)
        ]
    if isinstance(module, nn.RNNCellBase):  # LSTMCell, GRUCell, RNNCell
        return [Weight(module_name, module, tensor) for tensor in ("weight_ih", "weight_hh")]
    if isinstance(module, nn.MultiheadAttention):
        return [
            Weight(module_name, module, tensor)
            for tensor in _ATTENTION_WEIGHTS
            if isinstance(getattr(module, tensor, None), torch.Tensor)
        ]
    if _own_weight(module):
        return [Weight(module_name, module, "weight")]
    return []


def compressible_weights(model: nn.Module) -> dict[str, Weight]:
    """Every weight a stage can compress, by name, in the model's module order.

    Args:
        model: any module.

    Returns:
        {name: Weight}. Tied weights are one Weight, named by the holder that comes first; the
        others are its `aliases`.
    """
    found = [weight for name, module in model.named_modules() for weight in _weights_of(name, module)]
    holders: dict[int, list[Weight]] = {}
    for weight in found:
        holders.setdefault(_identity(weight.module, weight.tensor), []).append(weight)
    weights = {}
    for weight in found:
        group = holders[_identity(weight.module, weight.tensor)]
        if group[0] is not weight:
            continue  # an alias of the first holder
        if len(group) > 1:
            aliases = tuple(Holder(other.module_name, other.module, other.tensor) for other in group[1:])
            weight = Weight(weight.module_name, weight.module, weight.tensor, aliases)
        weights[weight.name] = weight
    return weights


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """The compressible weights that are one Parameter with another name in the model (tied
    weights: a language model's output layer reading its embedding's matrix).

    Args:
        model: any module, parametrized or not.

    Returns:
        {weight name: every parameter name of that tensor, in the model's order}; {} when
        nothing is tied.
    """
    # One module registered under two names (model.b = model.a) is not a tie: a parametrization
    # registered on it is seen under both. Only distinct modules holding one tensor count.
    holders: dict[int, dict[int, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its `original` is its owner's tensor, counted below under the owner's key
        if parametrize.is_parametrized(module):
            for tensor in module.parametrizations:
                holders.setdefault(_identity(module, tensor), {}).setdefault(id(module), _join(module_name, tensor))
        for tensor, parameter in module.named_parameters(recurse=False):
            holders.setdefault(id(parameter), {}).setdefault(id(module), _join(module_name, tensor))
    tied = {}
    for name, weight in compressible_weights(model).items():
        group = list(holders.get(_identity(weight.module, weight.tensor), {}).values())
        if len(group) > 1:
            tied[name] = group
    return tied


def check_weights(model: nn.Module) -> None:
    """Refuse a model that no stage can work on: a compressible weight tied to a tensor that is
    not a compressible weight, or floating parameters that are not float32.

    Tied compressible weights (an Embedding's matrix read by a Linear output layer) are one
    Weight whose parametrizations sit on every holder. A tie to anything else (a bias, a custom
    module's parameter under another name than `weight`) would go on computing with the tensor
    without its mask or codebook, and the two would part while retraining. And retraining feeds
    float32 data through float32 layers. So both are refused before anything runs, with the fix.

    Args:
        model: the model a stage or run is given.

    Raises:
        UnsupportedLayerError: a compressible weight is also held as a tensor deepshrink does not
            compress.
        ModelError: a TorchScript module, a parameter of a lazy module not initialised yet, an embedding that
            renormalises its rows in place while running (`max_norm`) or has sparse gradients,
            or a floating parameter that is float16, bfloat16 or float64.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script or trace), whose "
            "layers cannot take a mask or a codebook: pass the Python module it was made from; the file loads "
            "into that module, which you can script again afterwards"
        )
    lazy = [name for name, parameter in model.named_parameters() if nn.parameter.is_lazy(parameter)]
    if lazy:
        module = lazy[0].rpartition(".")[0]
        raise ModelError(
            f"{lazy[0]} is not initialised yet ({type(model.get_submodule(module)).__name__} sizes its weights on "
            "its first call): run one batch through the model first, e.g. model(inputs[:1]), then compress it"
        )
    _check_embeddings(model)
    weights = compressible_weights(model)
    for name, group in tied_weights(model).items():
        compressed = {weights[name].key, *weights[name].alias_keys}
        other = [key for key in group if key not in compressed]
        if other:
            module, _, tensor = other[0].rpartition(".")
            kind = type(model.get_submodule(module)).__name__
            raise UnsupportedLayerError(
                f"{weights[name].key} is also {other[0]} ({kind}.{tensor}), a tensor deepshrink does not compress; "
                "the mask and codebook would not reach it, and the two would part while retraining. Untie them "
                f"first, e.g. model.get_submodule({module!r}).{tensor} = "
                f"torch.nn.Parameter(model.get_parameter({other[0]!r}).detach().clone()), or read the weight "
                f"through its layer (ties between {SUPPORTED_TYPES} weights are compressed as one tensor)"
            )
    other = [
        (name, parameter.dtype)
        for name, parameter in model.named_parameters()
        if parameter.is_floating_point() and parameter.dtype != torch.float32
    ]
    if other:
        name, dtype = other[0]
        raise ModelError(
            f"{name} is {str(dtype).removeprefix('torch.')} ({len(other)} parameter(s) are not float32); "
            "deepshrink retrains and compresses float32 models: pass model.float() (exact from float16 and "
            "bfloat16), and load the file into a float32 model"
        )


def _check_embeddings(model: nn.Module) -> None:
    """Embeddings whose forward a mask or codebook cannot sit under: `max_norm` rewrites the
    looked-up rows in place on every call (it would scale shared values off their codebook, and
    torch refuses it on a parametrized weight), and sparse gradients do not add to a dense
    weight decay. Each has a fix that keeps what the model computes, given in the message."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding | nn.EmbeddingBag):
            continue
        if module.max_norm is not None:
            # A trained embedding's rows are renormalised once, as its forward would on their
            # next lookup: from then on max_norm changes nothing (but an ulp, which its own
            # forward also moves a row by on every call), so it can go.
            raise ModelError(
                f"{name} renormalises the rows it looks up in place on every call (max_norm={module.max_norm}), "
                "which a pruned or shared weight cannot take: renormalise them once and turn it off, "
                f"as its forward would: layer = model.get_submodule({name!r}); "
                "layer.weight.data.renorm_(layer.norm_type, 0, layer.max_norm); layer.max_norm = None"
            )
        if module.sparse:
            raise ModelError(
                f"{name} gives sparse gradients (sparse=True), which retraining's weight decay cannot add to; "
                f"the weights are the same with dense ones: model.get_submodule({name!r}).sparse = False"
            )


def tied_modules(model: nn.Module) -> set[str]:
    """The names of the modules that hold a tied weight (each holder of each tied tensor):
    what a rewrite of one layer alone (BatchNorm folding, clearing dead units, low-rank
    factorization) must leave as it is, since it would change the other holders too.

    Args:
        model: any module.

    Returns:
        The module names.
    """
    return {
        holder
        for weight in compressible_weights(model).values()
        if weight.aliases
        for holder in (weight.module_name, *(alias.module_name for alias in weight.aliases))
    }


def matching(pattern: str, names: Iterable[str]) -> list[str]:
    """The names the glob `pattern` matches, in order; case-sensitive, as layer names are.

    Args:
        pattern: an fnmatch glob.
        names: the names to match.

    Returns:
        The matching names.
    """
    return [name for name in names if fnmatch.fnmatchcase(name, pattern)]


def _pattern_selects(pattern: str, weight: Weight) -> bool:
    """A pattern names a weight by its own name, its state_dict key ("fc1.weight") or its module
    ("lstm" selects every matrix of the LSTM)."""
    texts = [weight.name, weight.key, weight.module_name]
    for alias in weight.aliases:  # a tied weight answers to each holder's names too
        texts += [alias.name, alias.key, alias.module_name]
    return any(fnmatch.fnmatchcase(text, pattern) for text in texts if text)


def weights_matching(pattern: str, weights: dict[str, Weight]) -> list[str]:
    """The names of the weights `pattern` selects, in order.

    Args:
        pattern: a glob on a weight's name, its state_dict key or its module.
        weights: {name: Weight}, as compressible_weights gives.

    Returns:
        The names selected.
    """
    return [name for name, weight in weights.items() if _pattern_selects(pattern, weight) or name == pattern]


def _unsupported(model: nn.Module, pattern: str) -> list[str]:
    """What `pattern` names that holds parameters but no compressible weight: "name (Type)"."""
    found = []
    for module_name, module in model.named_modules():
        for tensor, _ in module.named_parameters(recurse=False):
            key = _join(module_name, tensor)
            if fnmatch.fnmatchcase(key, pattern) or (module_name and fnmatch.fnmatchcase(module_name, pattern)):
                found.append(f"{key} ({type(module).__name__}.{tensor})")
    return found


def select_weights(model: nn.Module, patterns: Iterable[str] | None = None) -> dict[str, Weight]:
    """The compressible weights any of the glob `patterns` selects (all when None), in model order.

    Args:
        model: any module.
        patterns: globs on a weight's name ("fc1", "lstm.weight_hh_l0"), its state_dict key
            ("fc1.weight") or its module ("lstm": all of its matrices); None for all.

    Returns:
        {name: Weight}.

    Raises:
        UnsupportedLayerError: a pattern matches only tensors deepshrink does not compress
            (named, with their module types).
        ConfigError: a pattern matches nothing (the weights there are listed): a typo must not
            silently leave a layer uncompressed.
    """
    weights = compressible_weights(model)
    if patterns is None:
        return weights
    selected: set[str] = set()
    for pattern in list(patterns):
        matches = weights_matching(pattern, weights)
        if not matches:
            unsupported = _unsupported(model, pattern)
            if unsupported:
                shown = ", ".join(unsupported[:5]) + (
                    f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
                )
                raise UnsupportedLayerError(
                    f"layer pattern {pattern!r} matches only tensors deepshrink does not compress: {shown}. "
                    f"It compresses the weight matrices of {SUPPORTED_TYPES}; biases and normalisation "
                    "parameters are stored losslessly"
                )
            raise ConfigError(f"layer pattern {pattern!r} matches no layer; the layers are {', '.join(weights)}")
        selected.update(matches)
    return {name: weight for name, weight in weights.items() if name in selected}


def match_per_layer(weights: dict[str, Weight], values: dict[str, float], what: str) -> dict[str, float]:
    """Resolve {glob pattern: value} into {weight name: value}; a later pattern wins over an earlier one.

    Args:
        weights: {name: Weight}, as compressible_weights gives them.
        values: {glob: value}, matched as in `select_weights`.
        what: the setting's name, for the error message.

    Returns:
        {weight name: value} for every weight some pattern selects.

    Raises:
        ConfigError: a pattern that matches no weight.
    """
    resolved: dict[str, float] = {}
    for pattern, value in values.items():
        matches = weights_matching(pattern, weights)
        if not matches:
            raise ConfigError(f"{what} pattern {pattern!r} matches no layer; the layers are {', '.join(weights)}")
        for name in matches:
            resolved[name] = value
    return resolved


def plain_state_dict(model: nn.Module, *, stand_ins: Collection[str] | bool = ()) -> dict[str, torch.Tensor]:
    """The state_dict a model without parametrizations would have, holding the effective values.

    `X.parametrizations.weight.original` becomes `X.weight` (the pruned or shared weight as the
    layer computes with it); the parametrizations' own entries are dropped. Never build this by
    deep-copying a model and removing parametrizations from the copy: the copy shares the
    original's dynamically created class, so removing them from one breaks the other.

    Args:
        model: parametrized or not; left as it is.
        stand_ins: keys (or True: every parametrized key) whose entry is the stored `original`
            tensor, of the same shape and dtype, instead of the effective value: for keys and
            sizes, or weights the caller reads from their codebook, without building a dense
            weight (VGG-16's shared layers took 1.1 s of a 1.8 s save, built twice).

    Returns:
        {plain key: tensor}, in state_dict order.
    """
    state = {}
    parametrized_prefix = ".parametrizations."
    for key, value in model.state_dict().items():
        if parametrized_prefix not in key:
            state[key] = value
            continue
        owner, _, rest = key.partition(parametrized_prefix)
        tensor_name, _, tail = rest.partition(".")
        if tail == "original":
            plain = f"{owner}.{tensor_name}" if owner else tensor_name
            if stand_ins is True or (stand_ins is not False and plain in stand_ins):
                state[plain] = value
            else:
                state[plain] = getattr(model.get_submodule(owner), tensor_name).detach()
    return state


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` without parametrizations: each parametrized tensor becomes a plain
    parameter holding its effective value (a pruned weight with its exact zeros, a shared one
    with its codebook's values). `model` is left as it is.

    Not `remove_parametrizations` on a deep copy: the copy shares the original's dynamically
    created class, and removing the last parametrization deletes the property from that class,
    breaking the original. Each copied module is given its plain class back instead.

    Args:
        model: parametrized or not.

    Returns:
        The plain copy, on the model's device.
    """
    copied = copy.deepcopy(model)
    # Tied weights stay tied: every holder of one original gets the one new Parameter.
    replacements: dict[int, nn.Parameter] = {}
    for module in list(copied.modules()):
        if not parametrize.is_parametrized(module):
            continue
        values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
        originals = {name: module.parametrizations[name].original for name in values}
        del module._modules["parametrizations"]
        module.__class__ = module.__class__.__bases__[0]  # the class register_parametrization derived from
        for name, value in values.items():
            original = originals[name]
            if id(original) not in replacements:
                replacements[id(original)] = nn.Parameter(value, requires_grad=original.requires_grad)
            module.register_parameter(name, replacements[id(original)])
    return copied


# A parametrized weight's entries in a state_dict: MODULE.parametrizations.TENSOR.POSITION.FIELD,
# POSITION being the parametrization's place in the tensor's list (torch.nn.utils.parametrize).
_PARAMETRIZED = re.compile(
    r"^(?:(?P<module>.+)\.)?parametrizations\.(?P<tensor>[^.]+)\.(?P<position>\d+)\.(?P<field>[^.]+)$"
)


def parametrization_entries(state_dict, field: str) -> list[tuple[str, int, str]]:
    """(weight key, position, key prefix) of every parametrization entry named `field` (e.g.
    "mask", "codebook"), in state_dict order. The weight key is the tensor's plain state_dict key
    ("fc1.weight", "lstm.weight_hh_l0"); the prefix + another field name is that
    parametrization's other entry.

    Args:
        state_dict: a state_dict (or its keys).
        field: the entry's name.

    Returns:
        The (weight key, position, key prefix) triples.
    """
    entries = []
    for key in state_dict:
        found = _PARAMETRIZED.match(key)
        if found and found["field"] == field:
            weight_key = _join(found["module"] or "", found["tensor"])
            entries.append((weight_key, int(found["position"]), key[: -len(field)]))
    return entries


def weights_by_key(model: nn.Module) -> dict[str, Weight]:
    """compressible_weights keyed by each weight's state_dict key.

    Args:
        model: any module.

    Returns:
        {state_dict key: Weight}.
    """
    weights = {weight.key: weight for weight in compressible_weights(model).values()}
    # A tied weight's entries are in a state_dict under each holder's key, as one Weight.
    for weight in list(weights.values()):
        weights.update(dict.fromkeys(weight.alias_keys, weight))
    # A module registered under two names (model.b = model.a) has its entries under both in a
    # state_dict; the second name's key is the same Weight, which a restore finds already done.
    canonical = {(id(weight.module), weight.tensor): weight for weight in weights.values()}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for alias in _weights_of(module_name, module):
            if alias.key not in weights and (id(module), alias.tensor) in canonical:
                weights[alias.key] = canonical[(id(module), alias.tensor)]
    return weights


def check_position(weight: Weight, position: int) -> None:
    """A parametrization saved at `position` of a weight's list is registered there: the ones
    before it must be restored first.

    Args:
        weight: the weight.
        position: the parametrization's position in the saved state_dict.

    Raises:
        ConfigError: another number of parametrizations is registered.
    """
    registered = len(weight.parametrizations())
    if registered != position:
        raise ConfigError(
            f"the state_dict holds parametrization {position} of {weight.name!r}, but {registered} are registered: "
            "restore them in order (checkpoint.load_state_into does)"
        )
