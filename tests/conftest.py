"""Shared fixtures: small slices of the real offline datasets, prepared once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli

# Raw MNIST and FashionMNIST in torchvision's layout (<root>/MNIST/raw/*.gz): $INI_DATA_ROOT on an offline machine
# that keeps a copy, else data/ in the checkout, where the session downloads them as `prepare` does when absent.
DATA_ROOT = Path(os.environ.get("INI_DATA_ROOT") or Path(__file__).resolve().parents[1] / "data")
REAL_SETS = {"MNIST": "mnist", "FashionMNIST": "fashionmnist"}
_missing: list[str] = []


def has_raw(folder: str) -> bool:
    """Whether the raw set `folder` (MNIST, FashionMNIST) is there: its train images, gzipped or not."""
    return any((DATA_ROOT / folder / "raw").glob("train-images-idx3-ubyte*"))


def pytest_configure(config):
    """Fetch the real sets the tests slice, once, the way `prepare` does; what cannot be had is said at the end."""
    import torchvision.datasets as tvd

    from stages.data import raw

    for folder, name in REAL_SETS.items():
        if not has_raw(folder):
            why = raw.download_into(name, [DATA_ROOT], lambda root, c=getattr(tvd, folder): c(str(root), download=True))
            if why:
                _missing.append(f"{folder} ({why})")
    os.environ["INI_DATA_ROOT"] = str(DATA_ROOT)  # the stages the tests run in subprocesses look there too


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs on one intra-op thread: tiny tensors gain nothing from more, reductions then match the
    1-thread subprocesses some tests compare against, and benchmarks measure work rather than the scheduler."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args: str):
    """Run the CLI in-process; stdout and stderr stay separate."""
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def assert_one_line_error(result, *, code: int | None = None) -> str:
    assert result.exit_code != 0, result.stdout
    if code is not None:
        assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(scope="session")
def mnist_small(tmp_path_factory) -> Path:
    """1,000 real MNIST train images (200 of them val) and 200 test images."""
    if not has_raw("MNIST"):
        pytest.skip(f"real MNIST not found under {DATA_ROOT}")
    out = tmp_path_factory.mktemp("data") / "mnist.h5"
    result = invoke(
        "prepare", "--dataset", "mnist", "--data-root", DATA_ROOT, "--limit", 1000, "--val-size", 200, "--out", out
    )
    assert result.exit_code == 0, result.stderr
    return out


def pytest_terminal_summary(terminalreporter):
    """What a skip for want of data means; after a measuring run of test_bench_inference: latency relative to
    undefended, InI's speed-up over each."""
    if _missing:
        terminalreporter.write_line(
            f"the tests on real data skipped: no raw {', '.join(_missing)} under {DATA_ROOT}; offline, set "
            "INI_DATA_ROOT to a folder in torchvision's layout (<root>/MNIST/raw/*.gz)"
        )
    try:
        from test_bench_inference import RESULTS
    except ImportError:
        return
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("inference latency of the deployed graph (median), relative to undefended; InI speed-up = baseline / InI")
    write(f"{'device':<6} {'batch':>5} {'defense':<24} {'median ms':>10} {'x undefended':>13} {'InI speed-up':>13}")
    for (device, defense, batch), median in sorted(RESULTS.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[1])):
        base, ini = RESULTS.get((device, "none", batch)), RESULTS.get((device, "ini", batch))
        ratio = f"{median / base:13.2f}" if base else f"{'-':>13}"
        speedup = f"{median / ini:12.1f}x" if ini else f"{'-':>13}"
        write(f"{device:<6} {batch:>5} {defense:<24} {1000 * median:10.3f} {ratio} {speedup}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A hand-made 10-class dataset/1 file (tests/tiny_data.py): 160 / 40 / 40 images of 1x28x28."""
    from tiny_data import write_dataset

    return write_dataset(tmp_path_factory.mktemp("tiny") / "synth.h5")


@pytest.fixture(scope="module")
def victim(tiny, tmp_path_factory) -> Path:
    """A LeNet-5 victim trained one epoch on `tiny`."""
    out = tmp_path_factory.mktemp("victim") / "victim.h5"
    result = invoke("train", "--dataset", tiny, "--epochs", 1, "--batch-size", 32, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def pg():
    """A throwaway PostgreSQL server (initdb + pg_ctl on a Unix socket in a temp folder, fsync off: what is under
    test is the ledger's transactions, not the disk); skipped, with the reason, where none can start here."""
    pytest.importorskip("psycopg", reason="psycopg 3 not installed: pip install 'ini-toolkit[postgres]'")
    from stages.serving.throwaway_pg import ThrowawayPostgres, Unavailable

    try:
        server = ThrowawayPostgres(fsync=False)
        server.start()
    except (Unavailable, OSError) as e:
        pytest.skip(f"no throwaway PostgreSQL server here: {e}")
    yield server
    server.__exit__()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_at(request, tmp_path) -> str:
    """Where a ledger lives: a SQLite file, or a new database on the throwaway PostgreSQL server (skipped without)."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    import uuid

    return request.getfixturevalue("pg").create(f"ledger_{uuid.uuid4().hex}")
