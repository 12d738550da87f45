"""The images an evaluation reads, as uint8 RGB batches (B, H, W, 3), checked before any feature is
computed:

- ``samples.npz`` as OpenAI's ADM evaluator reads it (``arr_0``: (N, H, W, 3) uint8), read in
  batches straight from the uncompressed zip member, so that 50,000 images at 256x256 (9.8 GB)
  never sit in memory at once;
- a folder of PNG images (``images/000000.png ...`` of a sampling job), in file-name order;
- an array in memory (the training callback's samples, converted by sampling_job.to_uint8).

A PNG is lossless, so a job's folder and its ``samples.npz`` give the same numbers.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageSource:
    """``len(source)`` images; ``source.batch(start, stop)`` -> (B, H, W, 3) uint8."""

    name: str
    shape: tuple[int, int]  # (H, W) of every image

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies these images: a resumed extraction must find the same (see ``content``)."""
        return {"source": self.name, "num": len(self), "resolution": list(self.shape), **self.content()}

    def content(self) -> dict:
        """A cheap stand-in for the images' bytes, so that features extracted from images since replaced
        at the same path are not reused; none by default."""
        return {}


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    """``images`` if they are (N, H, W, 3) uint8; otherwise a ValueError saying what they are and how to fix it."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array of images, got {type(images).__name__}")
    if images.dtype != np.uint8:
        nan = " and holds NaN values (the sampler diverged?)" if images.dtype.kind == "f" and np.isnan(images).any() else ""
        raise ValueError(f"{what} has dtype {images.dtype}{nan}; evaluation reads uint8 images 0..255, as samples.npz's "
                         "arr_0 holds them (float images in [-1, 1] become uint8 by ADM's ((x + 1) * 127.5).clamp(0, 255))")
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (channels first? arr_0 is (N, H, W, 3))" if images.ndim == 4 and images.shape[1] == 3 else ""
        raise ValueError(f"{what} has shape {tuple(images.shape)}; expected (N, H, W, 3) RGB images{hint}")
    return images


class ArrayImages(ImageSource):
    def __init__(self, images: np.ndarray, name: str = "array"):
        self.images, self.name = check_images(images, name), name
        self.shape = tuple(self.images.shape[1:3])

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, start: int, stop: int) -> np.ndarray:
        return self.images[start:stop]


class NpzImages(ImageSource):
    """``arr_0`` of an .npz, read in slices: np.savez stores members uncompressed, so the zip member
    is seekable and a batch costs its own bytes only."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path, self.name = Path(path), str(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"samples={path} does not exist; pass a samples.npz or a folder of PNG images")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise ValueError(f"{path} is not an .npz file (not a zip archive); pass the samples.npz a sampling "
                             "job wrote, or a folder of PNG images") from None
        member = self._member = f"{key}.npy"
        if member not in self._zip.namelist():
            keys = sorted(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
            raise ValueError(f"{path} holds no {key!r} array (it holds {keys}); evaluation reads the images from "
                             f"{key}, as ADM's evaluator does")
        info = self._zip.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:  # np.savez_compressed: read whole (no random access)
            with np.load(self.path) as f:
                self._array: np.ndarray | None = check_images(f[key], f"{path}:{key}")
            self.shape = tuple(self._array.shape[1:3])
            return
        self._array = None
        with self._zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"{path}:{key} is in .npy format version {version}; write it with np.savez")
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if dtype.kind == "f" or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            with np.load(self.path) as f:  # the full check, with its NaN test and hints
                check_images(f[key], f"{path}:{key}")
        if fortran:  # column-major bytes: a slice of rows is not contiguous, so read it whole
            with np.load(self.path) as f:
                self._array = np.ascontiguousarray(f[key])
        self._shape4 = shape
        self.shape = tuple(shape[1:3])
        self._row = int(np.prod(shape[1:]))

    def content(self) -> dict:
        # The member's CRC-32 and size, read from the zip directory: free, and unchanged when a finished
        # sampling job rewrites the same images (the file's own bytes, with the zip's timestamps, are not).
        info = self._zip.getinfo(self._member)
        return {"crc32": info.CRC, "bytes": info.file_size}

    def __len__(self) -> int:
        return len(self._array) if self._array is not None else self._shape4[0]

    def batch(self, start: int, stop: int) -> np.ndarray:
        if self._array is not None:
            return self._array[start:stop]
        stop = min(stop, len(self))
        with self._zip.open(self._member) as f:
            f.seek(self._offset + start * self._row)
            data = f.read((stop - start) * self._row)
        return np.frombuffer(data, dtype=np.uint8).reshape(stop - start, *self._shape4[1:])


class FolderImages(ImageSource):
    """The images of a folder (not its subfolders), sorted by file name, decoded to RGB."""

    def __init__(self, path: str | Path):
        self.path, self.name = Path(path), str(path)
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"samples={path} is a folder without images ({', '.join(IMAGE_SUFFIXES)}); pass a "
                             "folder of PNG images or a samples.npz")
        self.shape = self._read(self.files[0]).shape[:2]

    def _read(self, file: Path) -> np.ndarray:
        try:
            with Image.open(file) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{file} cannot be read as an image ({e}); replace or delete it") from None

    def content(self) -> dict:
        # Names, sizes and modification times of the files: a stat each, not a read.
        digest = hashlib.sha256()
        for file in self.files:
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {"files_sha256": digest.hexdigest()}

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, start: int, stop: int) -> np.ndarray:
        images = [self._read(f) for f in self.files[start:stop]]
        for file, image in zip(self.files[start:stop], images):
            if image.shape[:2] != self.shape:
                raise ValueError(f"{file} is {image.shape[1]}x{image.shape[0]}, the folder's first image "
                                 f"{self.shape[1]}x{self.shape[0]}; evaluate images of one size")
        return np.stack(images)


def open_images(path: str | Path) -> ImageSource:
    """A samples.npz, or a folder of images (a sampling job's directory: its ``samples.npz``)."""
    path = Path(path)
    if path.is_dir():
        if (path / "samples.npz").is_file():
            return NpzImages(path / "samples.npz")
        return FolderImages(path)
    return NpzImages(path)


def read_labels(path: str | Path, keys: Sequence[str] = ("labels", "prompts")) -> dict[str, np.ndarray]:
    """The conditions a samples.npz carries beside arr_0 (labels or prompts), for the text metrics."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.npz"
    if not path.is_file() or path.suffix != ".npz":
        return {}
    with np.load(path) as f:
        return {k: f[k] for k in keys if k in f.files}
