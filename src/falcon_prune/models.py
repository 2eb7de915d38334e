"""The networks of the paper's settings, with state-dict keys that load the public checkpoints.

- :class:`MLPNet`: 784-40-20-10 ReLU MLP without biases (MNIST), log-softmax output.
- :func:`resnet20`: the CIFAR-10 ResNet20 (3 stages x 3 BasicBlocks, 16/32/64 channels,
  1x1-conv + BN downsample shortcuts). Keys match the shared checkpoint after stripping
  ``module.``.
- :func:`mobilenet_v1`: MobileNetV1 for ImageNet (depthwise-separable, width 1.0).
- :func:`resnet50`: ResNet50 for ImageNet with torchvision's key names (torchvision itself is
  not needed).
- :func:`load_language_model` / :func:`save_language_model`: HuggingFace causal language
  models from a directory or a GGUF file, and back to a directory (``[hf]`` extra).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from falcon_prune.errors import (
    CheckpointError,
    ConfigError,
    DependencyError,
    MissingFileError,
)


class MLPNet(nn.Module):
    """784-40-20-10 ReLU MLP without biases; returns log-probabilities. Input (N, 1, 28, 28)
    or (N, 784)."""

    def __init__(self, sizes: tuple[int, ...] = (784, 40, 20, 10)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1], bias=False)
        self.fc2 = nn.Linear(sizes[1], sizes[2], bias=False)
        self.fc3 = nn.Linear(sizes[2], sizes[3], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; 1x1-conv + BN shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, section 4.2)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width]
        self.in_planes = width
        self.layer1 = self._stage(planes[0], n, 1)
        self.layer2 = self._stage(planes[1], n, 2)
        self.layer3 = self._stage(planes[2], n, 2)
        self.fc = nn.Linear(planes[2], num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR-10 ResNet20: 270,896 prunable weights, 40.8 M MACs per 32x32 image."""
    return CifarResNet(20, num_classes)


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017) for 224x224 ImageNet inputs, width multiplier 1.0."""

    _CFG = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(c * width_mult))

        layers: list[nn.Module] = [
            nn.Conv2d(3, ch(32), 3, 2, 1, bias=False),
            nn.BatchNorm2d(ch(32)),
            nn.ReLU(inplace=True),
        ]
        c_in = ch(32)
        for item in self._CFG:
            c_out, stride = (item, 1) if isinstance(item, int) else item
            c_out = ch(c_out)
            layers += [
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)


class Bottleneck(nn.Module):
    """torchvision-compatible ResNet bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet50(nn.Module):
    """ResNet50 for ImageNet; parameter names match ``torchvision.models.resnet50``."""

    def __init__(self, num_classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.in_planes = 64
        self.layer1 = self._stage(64, layers[0], 1)
        self.layer2 = self._stage(128, layers[1], 2)
        self.layer3 = self._stage(256, layers[2], 2)
        self.layer4 = self._stage(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        mods = []
        for s in [stride] + [1] * (blocks - 1):
            mods.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 1000) -> ResNet50:
    return ResNet50(num_classes)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlpnet": MLPNet,
    "resnet20": resnet20,
    "mobilenet_v1": mobilenet_v1,
    "resnet50": resnet50,
}

#: an example input shape (without batch) for every zoo model
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlpnet": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "mobilenet_v1": (3, 224, 224),
    "resnet50": (3, 224, 224),
}


def create_model(name: str) -> nn.Module:
    """A zoo model by name (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]()


def _extract_state_dict(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(
        "the checkpoint holds no state dict: expected a dict of tensors or a dict with a "
        "'state_dict' / 'model_state_dict' / 'model' entry"
    )


def normalize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.`` (DataParallel) prefixes and fold the reference MLPNet layout
    (``fc1._layer.weight`` with a ``fc1._weight_mask``) into plain ``fc1.weight`` values
    (mask applied)."""
    out: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.endswith("._weight_mask"):
            masks[k.removesuffix("._weight_mask") + ".weight"] = v
            continue
        out[k.replace("._layer.", ".")] = v
    for k, m in masks.items():
        if k in out:
            out[k] = out[k] * m.to(out[k].dtype)
    return out


def read_checkpoint(path: Path) -> object:
    """``torch.load`` of a checkpoint file, with a CheckpointError that says what is wrong
    when the file is empty, truncated or not a PyTorch checkpoint."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); check the file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, AttributeError, ImportError, KeyError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is corrupt, "
            "truncated or not a PyTorch checkpoint") from e


def load_model(name: str, path: str | Path) -> nn.Module:
    """The zoo model ``name`` with the checkpoint at ``path`` loaded; a checkpoint that
    holds a whole module (a network made physically smaller by structured pruning, saved
    by the command line under ``"module"``) is returned as it is."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("module"), nn.Module):
        return obj["module"]
    return load_checkpoint(create_model(name), path)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint file into ``model`` (strict), accepting the shared checkpoints'
    layouts. Raises ``ValueError`` naming missing/unexpected keys when they do not match."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    obj = read_checkpoint(path)
    state = normalize_state_dict(_extract_state_dict(obj))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path.name} does not match {type(model).__name__}: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
            "Check that the model architecture matches the checkpoint."
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(
            f"checkpoint {path.name} has tensors of the wrong shape for {type(model).__name__}: "
            + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:5])
        )
    model.load_state_dict(state)
    return model


# -- HuggingFace language models ---------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise DependencyError("language models need transformers: pip install "
                              "'falcon-prune[hf]'") from e
    return transformers


def load_language_model(path: str | Path, dtype: torch.dtype = torch.float32
                        ) -> tuple[nn.Module, object]:
    """A HuggingFace causal language model (eval mode) and its tokenizer, from a directory
    (``from_pretrained``) or a GGUF file (dequantised to ``dtype`` by transformers with the
    ``gguf`` package). A GGUF model is rebuilt from its configuration without the GGUF
    quantisation record, so that it saves and loads like any other."""
    T = _transformers()
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: give a HuggingFace model directory "
                               "or a .gguf file")
    if path.is_dir():
        model = load_pruned(path, dtype) if (path / WIDTHS_FILE).exists() else \
            T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.eval(), T.AutoTokenizer.from_pretrained(path)
    if path.suffix != ".gguf":
        raise ConfigError(f"{path} is a file but not a .gguf model; give a directory or a "
                          ".gguf file")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise DependencyError("GGUF files need the gguf package: pip install gguf") from e
    where = {"gguf_file": path.name}
    loaded = T.AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **where)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval(), T.AutoTokenizer.from_pretrained(path.parent, **where)


def save_language_model(model: nn.Module, tokenizer: object, directory: str | Path) -> Path:
    """``save_pretrained`` of ``model`` with its pruning masks folded into plain weights (in
    a copy), and of its tokenizer, to ``directory``; ``from_pretrained`` loads it back."""
    from falcon_prune.analysis.masks import plain_copy

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = plain_copy(model)
    plain.save_pretrained(directory)
    widths = _widths(plain)
    if widths["parameters"] or widths["attributes"]:
        (directory / WIDTHS_FILE).write_text(json.dumps(widths, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


#: the file of a structurally pruned model's directory that records its per-layer widths
WIDTHS_FILE = "falcon_prune_widths.json"


def _blank(config: object) -> nn.Module:
    """The model ``config`` describes, on the meta device (shapes only, no memory)."""
    T = _transformers()
    with torch.device("meta"):
        return T.AutoModelForCausalLM.from_config(config)


def _widths(model: nn.Module) -> dict:
    """What a structurally pruned ``model`` changed from the model its config describes:
    {'parameters': {name: shape}, 'attributes': {'module.attr': int}} (the parameters of
    other shapes, and integer attributes such as head counts and layer widths)."""
    blank = _blank(model.config)
    shapes = {n: tuple(p.shape) for n, p in blank.named_parameters()}
    modules = dict(blank.named_modules())
    parameters = {n: list(p.shape) for n, p in model.named_parameters()
                  if n in shapes and tuple(p.shape) != shapes[n]}
    attributes = {}
    for name, m in model.named_modules():
        b = modules.get(name)
        for attr, value in vars(m).items():
            if type(value) is int and b is not None and getattr(b, attr, value) != value:
                attributes[f"{name}.{attr}" if name else attr] = value
    return {"parameters": parameters, "attributes": attributes}


def load_pruned(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A structurally pruned causal language model written by ``save_language_model``
    (or ``falcon-prune prune --hf ... --structure channels``), in evaluation mode: the
    model its config describes, with the parameter shapes and the integer attributes
    (widths, head counts) that the directory records, and its weights (safetensors)."""
    from safetensors.torch import load_file

    T = _transformers()
    directory = Path(directory)
    widths_file = directory / WIDTHS_FILE
    if not widths_file.exists():
        raise MissingFileError(f"{directory} has no {WIDTHS_FILE}: it is not a structurally "
                               "pruned model (load it with from_pretrained)")
    widths = json.loads(widths_file.read_text())
    config = T.AutoConfig.from_pretrained(directory)
    model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, shape in widths["parameters"].items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr,
                nn.Parameter(torch.empty(shape, dtype=dtype)))
    for path, value in widths["attributes"].items():
        owner, _, attr = path.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, value)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{directory} has no .safetensors weights")
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{directory}: the weights do not match the recorded widths "
                              f"(missing {sorted(set(missing) - tied)[:5]}, unexpected "
                              f"{sorted(unexpected)[:5]})")
    model.tie_weights()
    return model.to(dtype).eval()
