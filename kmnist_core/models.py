"""Model registry. Class count and input size come from the dataset, so 49- and 3,832-class variants work."""

from __future__ import annotations

import copy
import io
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kmnist_core import transforms
from kmnist_core.card import ModelCard
from kmnist_core.errors import KmnistError


class SimpleCNN(nn.Module):
    """The study's network: two 3x3 convs with max-pooling, dropout, two linear layers."""

    def __init__(self, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.pool = nn.MaxPool2d(2)
        side = ((input_size - 2) // 2 - 2) // 2
        self.fc1 = nn.Linear(64 * side * side, 128)  # 1600 at 28x28
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.dropout(x))


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class StagedCNN(nn.Module):
    """3x3 conv + batch norm + ReLU stages separated by 2x2 max-pooling, global average pool, linear head.

    `widths` gives each stage's channels, `depths` its number of convs.
    """

    def __init__(self, num_classes: int, input_size: int, widths: tuple[int, ...], depths: tuple[int, ...], dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(depth):
                layers.append(conv_bn(cin, width))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class RejectCNN(StagedCNN):
    """StagedCNN with one more output, "none of these characters", trained as a class of its own: the
    outlier-exposure negatives are its examples (kmnist_core/train.py), rather than being pushed to the
    uniform distribution, so the model need not flatten a character's evidence to refuse a crop that also
    holds one (an overlay, a fragment shaped like a kana).

    `forward` gives the characters' log-probabilities under the softmax over all outputs, so everything
    downstream still sees `num_classes` outputs: a softmax over them is the confidence given a character,
    and their energy (-logsumexp, calibration.ood_score) is -log(1 - p(none)), the out-of-set score."""

    reject_class = True

    def __init__(self, num_classes: int, input_size: int, widths: tuple[int, ...], depths: tuple[int, ...]):
        super().__init__(num_classes + 1, input_size, widths, depths)

    def full_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the characters and, last, of "none of these" (what training's losses take)."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.full_logits(x), 1)[:, :-1]


# CPU speeds are against the study's SimpleCNN at batch 1024 on 2 cores, on predict's path (batch norm folded,
# channels-last): bench/model_figures.py, docs/benchmarks.md. Accuracies: README, "The default model".
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "simple-cnn": lambda n, size: SimpleCNN(n, size),
    # ~2.5x SimpleCNN's speed; 98.3 % on kmnist-dev trained on labels alone (the default until distillation).
    "compact-cnn": lambda n, size: StagedCNN(n, size, widths=(16, 32, 64), depths=(1, 2, 2)),
    # 1.5x the width, 1.1-1.3x SimpleCNN's speed: the default, distilled from five vgg-cnn (99.0 %).
    "compact-cnn-wide": lambda n, size: StagedCNN(n, size, widths=(24, 48, 96), depths=(1, 2, 2)),
    # compact-cnn-wide with a "none of these" class (RejectCNN): the same cost.
    "compact-cnn-wide-reject": lambda n, size: RejectCNN(n, size, widths=(24, 48, 96), depths=(1, 2, 2)),
    # The distillation teacher: 1.1 M parameters, ~0.17x SimpleCNN's speed.
    "vgg-cnn": lambda n, size: StagedCNN(n, size, widths=(64, 128, 256), depths=(2, 2, 2)),
    # vgg-cnn at half the width, as a student: 0.45-0.6x SimpleCNN's speed.
    "vgg-cnn-half": lambda n, size: StagedCNN(n, size, widths=(32, 64, 128), depths=(2, 2, 2)),
    # vgg-cnn-half with one conv at full resolution, where a conv costs most: 0.75-0.9x SimpleCNN's speed.
    "vgg-cnn-slim": lambda n, size: StagedCNN(n, size, widths=(32, 64, 128), depths=(1, 2, 2)),
}


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Fold each batch norm into the conv before it and switch to channels-last memory.

    Same outputs up to float rounding; on these CPUs oneDNN runs channels-last convs about twice as fast
    (bench/model_figures.py). Returns a new module in eval mode; `model` is left as it was.
    """
    model = copy.deepcopy(model).eval()
    for block in model.modules():
        if isinstance(block, nn.Sequential):
            for i in range(len(block) - 1):
                if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], nn.BatchNorm2d):
                    block[i] = fuse_conv_bn_eval(block[i], block[i + 1])
                    block[i + 1] = nn.Identity()
    return model.to(memory_format=torch.channels_last)


def create_model(name: str, num_classes: int, input_size: int) -> nn.Module:
    if name not in MODELS:
        raise KmnistError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    return MODELS[name](num_classes, input_size)


def load_torch_model(card: ModelCard, weights: bytes, source: str) -> nn.Module:
    """The card's architecture with `weights`, as read (and checked against the card) by
    kmnist_core/model_dir.py read_model_files. torch.load takes tensors only: no code is unpickled."""
    model = create_model(card.architecture, card.num_classes, card.input_size)
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise KmnistError(f"cannot load weights of {source}: {str(e).splitlines()[0]}") from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise KmnistError(f"weights of {source} do not match architecture {card.architecture!r} "
                          f"({card.num_classes} classes) named in its card: {str(e).splitlines()[0]}") from None
    return model


class TorchModel:
    """A torch model ready for inference on a device (batch norm folded, channels-last): fp32 logits on a GPU,
    or on CPU for a model directory without a usable fp32 ONNX twin. `threads`: torch's intra-op threads
    (a process-wide setting: set once per worker)."""

    def __init__(self, model: nn.Module, device: str, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.module = optimize_for_inference(model.to(device))
        self.device = device

    def logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return predict_logits(self.module, pixels, self.device, batch_size)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, device: str, batch_size: int = 1024) -> np.ndarray:
    """A torch model's logits for uint8 (N, S, S) light-on-dark images, a batch at a time, in eval mode.
    Inputs go in channels-last, which an inference-optimized model runs about twice as fast on CPU."""
    model.eval()
    out = [model(transforms.to_model_tensor(images[s : s + batch_size]).to(device)
                 .contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
