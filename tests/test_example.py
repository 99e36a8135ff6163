"""The examples: their data loading, real training runs under torchrun, and
what they say when data or an optional package is missing."""

from __future__ import annotations

import gzip
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from long_mode import long_only
from multiproc import run_world

from distlearn_cuda.examples import cifar10, data, digits

# Wall-clock bound of one torchrun training run; the defaults take ~5 s with
# 2 processes and ~10 s with 4 on a 2-core machine.
TRAINING_TIMEOUT_S = 120


def write_idx(path: Path, array: np.ndarray) -> None:
    """Writes ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in .gz.

    The test's own writer of the format: magic 00 00 08 ndim, big-endian
    uint32 dimensions, then the bytes.
    """
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 3, 4), (0, 28, 28)])
def test_read_idx_round_trips(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng().integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / f"a-idx{len(shape)}-ubyte{suffix}"
    write_idx(path, array)
    read = data.read_idx(path)
    assert read.shape == shape
    np.testing.assert_array_equal(read, array)


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # 0x0D: float32 IDX
    with pytest.raises(ValueError, match=r"bad.*not an IDX file"):
        data.read_idx(path)


def test_read_idx_rejects_truncated_data_and_header(tmp_path: Path) -> None:
    path = tmp_path / "short"
    write_idx(path, np.zeros((4, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"short.*truncated"):
        data.read_idx(path)
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"short.*truncated header"):
        data.read_idx(path)


def test_read_idx_rejects_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long"
    write_idx(path, np.zeros((4,), dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"long.*too long"):
        data.read_idx(path)


def write_fake_mnist(directory: Path, train: int, test: int, *, gzipped: bool, seed: int) -> None:
    """MNIST-shaped IDX files whose images are learnable: digit d lights up a
    4x4 block at a position of its own, over random background noise."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gzipped else ""
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        images = rng.integers(0, 64, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + 12 * row : 8 + 12 * row, 2 + 5 * col : 6 + 5 * col] = 255
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


@pytest.mark.parametrize("gzipped", [False, True])
def test_load_mnist_reads_the_four_files(tmp_path: Path, gzipped: bool) -> None:
    write_fake_mnist(tmp_path, 30, 11, gzipped=gzipped, seed=1)
    train, test = data.load_mnist(tmp_path)
    assert train.images.shape == (30, 1, 28, 28) and train.labels.shape == (30,)
    assert test.images.shape == (11, 1, 28, 28) and test.labels.shape == (11,)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    # Normalized with the training set's own statistics.
    assert abs(train.images.mean().item()) < 1e-5
    assert abs(train.images.std().item() - 1) < 1e-4
    raw_labels = data.read_idx(tmp_path / f"t10k-labels-idx1-ubyte{'.gz' if gzipped else ''}")
    np.testing.assert_array_equal(test.labels.numpy(), raw_labels)


def test_load_mnist_rejects_mismatched_counts(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, 30, 11, gzipped=False, seed=2)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(29, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train-labels.*29 labels for the 30 images"):
        data.load_mnist(tmp_path)


def test_load_mnist_rejects_labels_that_are_not_digits(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, 30, 11, gzipped=False, seed=3)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(11, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels.*not a digit"):
        data.load_mnist(tmp_path)


def test_load_mnist_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte"):
        data.load_mnist(tmp_path)


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_partition_is_disjoint_and_covers_every_sample(world_size: int, uneven: bool) -> None:
    n = 101
    parts = [data.partition(n, r, world_size, uneven=uneven, seed=5) for r in range(world_size)]
    assert sorted(torch.cat(parts).tolist()) == list(range(n))
    sizes = [len(p) for p in parts]
    if uneven:
        # Rank r's share is proportional to r + 1.
        total = world_size * (world_size + 1) / 2
        assert all(abs(s - n * (r + 1) / total) <= 1 for r, s in enumerate(sizes))
    else:
        assert max(sizes) - min(sizes) <= 1


def _train_on_fake_mnist(rank: int, world_size: int, directory: str, algo: str) -> float:
    return digits.main(["--data-dir", directory, "--algo", algo, "--tau", "2", "--epochs", "2"])


@pytest.mark.parametrize("algo", ["sgd", "ea"])
def test_example_trains_on_mnist_idx_files(tmp_path: Path, algo: str) -> None:
    write_fake_mnist(tmp_path, 600, 200, gzipped=True, seed=4)
    accuracies = run_world(_train_on_fake_mnist, 2, str(tmp_path), algo, timeout=90)
    # Every rank reports the accuracy of the confusion matrix summed over ranks.
    assert accuracies[0] == accuracies[1]
    assert accuracies[0] >= 0.9


def torchrun_digits(nproc: int, *args: str) -> float:
    """Runs the example under torchrun and returns the final accuracy rank 0 printed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(nproc), "-m", "distlearn_cuda.examples.digits", *args]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TRAINING_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
    found = re.findall(r"final test accuracy: ([0-9.]+)%", done.stdout)
    assert len(found) == 1, done.stdout[-4000:]
    return float(found[0]) / 100


# EA's in the long mode only (tests/long_mode.py): the README's main job is
# SGD's; tests/test_docs.py runs the docs' EA examples on 2 ranks.
@pytest.mark.parametrize("algo", ["sgd", pytest.param("ea", marks=long_only)])
def test_example_defaults_reach_95_percent_with_2_processes(algo: str) -> None:
    assert torchrun_digits(2, "--algo", algo) >= 0.95


# In the long mode only (tests/long_mode.py): CI runs the README's job on
# 2 processes above, and tests/test_matrix.py draws these options together.
@pytest.mark.parametrize(
    "options",
    [
        pytest.param(("--algo", "sgd", "--comm-dtype", "bfloat16", "--overlap"), marks=long_only),
        pytest.param(("--algo", "ea", "--comm-dtype", "bfloat16"), marks=long_only),
    ],
)
def test_example_reaches_95_percent_with_4_processes_on_uneven_parts_in_bfloat16(
    options: tuple[str, ...],
) -> None:
    # Options together, as users combine them: uneven parts (ranks that run
    # out early), bf16 communication (8 bits of mantissa: each averaged
    # gradient or delta is off by up to 2^-9 relative, which SGD's noise
    # swamps) and, for SGD, the overlapped reducer.
    assert torchrun_digits(4, *options, "--uneven") >= 0.95


def write_fake_cifar10(directory: Path, per_batch: int, seed: int) -> None:
    """The python-version batches, as pickled by CIFAR-10's own script, small."""
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        # Class-dependent images, so a few steps learn something.
        data = rng.integers(0, 64, (per_batch, 3072)) + (labels[:, None] * 19)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist()}
        batch[b"data"] = data.astype(np.uint8)
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)


def test_load_cifar10_reads_the_python_batches(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, 12, seed=3)
    train, test = data.load_cifar10(tmp_path)
    assert train.images.shape == (60, 3, 32, 32) and test.images.shape == (12, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and int(train.labels.max()) < 10
    # Normalized per channel by the training set's statistics (computed here in float64).
    raw = np.concatenate(
        [pickle.loads((tmp_path / f"data_batch_{i}").read_bytes())[b"data"] for i in range(1, 6)]
    ).reshape(-1, 3, 32, 32)
    mean = raw.astype(np.float64).mean(axis=(0, 2, 3))
    expected = (raw[:, 1].astype(np.float64) - mean[1]) / raw[:, 1].std(ddof=1)
    torch.testing.assert_close(
        train.images[:, 1].double(), torch.from_numpy(expected), atol=1e-5, rtol=1e-5
    )


def test_load_cifar10_refuses_what_is_not_a_batch(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, 4, seed=1)
    # A pickle that would run code when loaded is refused, not executed.
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(Path("x")))
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR-10"):
        data.load_cifar10(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_batch missing.*cifar-10-python\.tar\.gz"):
        data.load_cifar10(tmp_path)


def _train_on_fake_cifar10(rank: int, world_size: int, directory: str, algo: str) -> float:
    return cifar10.main(
        [
            "--data-dir",
            directory,
            "--algo",
            algo,
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--tau",
            "2",
        ]
    )


def test_cifar10_example_trains_a_short_run(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, 48, seed=5)
    accuracies = run_world(_train_on_fake_cifar10, 2, str(tmp_path), "sgd", timeout=90)
    assert accuracies[0] == accuracies[1] and 0.0 <= accuracies[0] <= 1.0


def start_example(module: str, *args: str, hide: str | None = None) -> subprocess.Popen:
    """Starts an example as a script; ``hide`` makes an installed package unimportable."""
    code = "import runpy, sys\n"
    if hide:
        code += f"sys.modules[{hide!r}] = None\n"
    code += f"sys.argv = [{module!r}, *{list(args)!r}]\n"
    code += f"runpy.run_module({module!r}, run_name='__main__')\n"
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """The exit status and stderr of a started example (killed after 60 s)."""
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, stderr


def test_examples_without_their_data_or_extras_say_so_in_one_line(tmp_path: Path) -> None:
    # Started together: each spends its time importing torch.
    cifar = start_example("distlearn_cuda.examples.cifar10", "--data-dir", str(tmp_path))
    extras = ["tqdm", "sklearn"]
    digits = [
        start_example("distlearn_cuda.examples.digits", "--epochs", "1", hide=h) for h in extras
    ]
    code, stderr = finish(cifar)
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and "cifar-10-python.tar.gz" in stderr
    for hidden, process in zip(extras, digits, strict=True):
        code, stderr = finish(process)
        assert code == 2, stderr
        assert stderr.strip().splitlines() == [
            f'this example needs {hidden}: pip install "distlearn_cuda[example]"'
        ], stderr
