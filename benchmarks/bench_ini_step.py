"""Time a plain SGD step, the reference InI step, the production (fast) InI step and the same production step fed
by the broad preset's OOD stream, side by side, on the same MNIST batch (LeNet-5, batch 128, faithful defaults,
PCGrad on), with peak memory; optionally full epochs.

    python benchmarks/bench_ini_step.py [--threads 1] [--rounds 7] [--epoch] [--device cuda]

Steps are timed in interleaved rounds (plain, reference, fast, plain, ...) so that load from other processes hits
all three alike; the median round is reported. Peak memory is each step's own, measured in a fresh process
(the kernel's resident high-water mark, reset after setup). `--epoch` also times full MNIST epochs of `train` and
`train-ini`, eager and compiled, in one process and as 2 DDP processes (the official code: 48 s per InI epoch on a
2-core machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from stages.data import prepared as _data  # noqa: E402
from stages.ini import fast, ood  # noqa: E402
from stages.ini.objective import Objective  # noqa: E402
from stages.ini.reference import ReferenceStep  # noqa: E402
from stages.training.torchrun import Ranks  # noqa: E402

KINDS = ("plain", "reference", "fast", "compiled", "broad")


def batch(size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real MNIST and Fashion-MNIST images when prepared (their blank borders make max-pool ties), else noise."""
    try:
        mnist = _data.load(ROOT / "artifacts/data/mnist.h5", splits=("train",)).splits["train"]
        fashion = _data.load(ROOT / "artifacts/data/fashionmnist.h5", splits=("train",)).splits["train"]
        return mnist[0][:size], mnist[1][:size], fashion[0][: 8 * size]
    except Exception:  # noqa: BLE001 - a benchmark still runs without prepared data
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (9 * size, 1, 28, 28), dtype=torch.uint8, generator=g)
        return images[:size], torch.randint(0, 10, (size,), generator=g), images[size:]


def steps(size: int = 128, device: str = "cpu") -> dict[str, callable]:
    """One callable per kind: a full optimiser step (zero_grad, gradients, SGD) on the same batch, on `device`."""
    images, labels, outliers = batch(size)
    x, labels, outliers = _data.to_float(images).to(device), labels.to(device), outliers.to(device)
    torch.manual_seed(0)
    victim = models.build_model("lenet5", 10, 1, 28, [0.1307], [0.3081]).to(device)
    torch.manual_seed(1)
    surrogate = models.build_model("lenet5", 10, 1, 28, [0.1307], [0.3081]).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(victim.parameters(), lr=1e-3, momentum=0.5, weight_decay=1e-3)
    stream = ood.OodStream(outliers, size, False, Ranks())
    gen = torch.Generator().manual_seed(0)
    stream.begin(gen)
    ini = {
        "reference": ReferenceStep(victim, [surrogate], stream, Objective(), Ranks()),
        "fast": fast.FastStep(victim, [surrogate], stream, Objective(), Ranks(), 28),
    }
    # the broad preset: the same production step, fed a heavily augmented mixture and derived outliers
    broad = ood.OodStream(
        [outliers[: len(outliers) // 2], outliers[len(outliers) // 2 :]],
        size,
        False,
        Ranks(),
        derived=ood.DERIVED,
        heavy=True,
    )
    broad.begin(torch.Generator().manual_seed(0))
    ini["broad"] = fast.FastStep(victim, [surrogate], broad, Objective(), Ranks(), 28)
    # the production step with its forward and jvp kernels fused by torch.compile (train-ini --compile on), where a
    # C++ compiler is found
    if fast.compiler_available():
        ini["compiled"] = fast.FastStep(
            victim, [surrogate], stream, Objective(), Ranks(), 28, fast.compiled_kernels(strict=True)
        )

    def plain():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(victim(x), labels).backward()
        optimizer.step()

    def make(step):
        def run():
            optimizer.zero_grad(set_to_none=True)
            step(x, labels, gen)
            optimizer.step()

        return run

    if device != "cpu":  # the compiled kernels are inductor's CPU kernels (train-ini compiles on the CPU only)
        ini.pop("compiled", None)
    fns = {"plain": plain, **{kind: make(ini[kind]) for kind in KINDS[1:] if kind in ini}}
    for fn in fns.values():
        fn.victim = victim
    return fns


def time_steps(rounds: int, iterations: int, device: str = "cpu") -> dict[str, list[float]]:
    fns = steps(device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # CUDA runs asynchronously
    for fn in fns.values():  # warm-up: first calls pick kernels and allocate
        for _ in range(3):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for kind, fn in fns.items():
            sync()
            tic = time.perf_counter()
            for _ in range(iterations):
                fn()
            sync()
            times[kind].append((time.perf_counter() - tic) / iterations)
    return times


def peak_device_memory(device: str) -> dict[str, float]:
    """MB that three steps of each kind add to the CUDA allocator's peak, after one warm-up step."""
    out = {}
    for kind, fn in steps(device=device).items():
        fn()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        out[kind] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return out


def peak_memory(kind: str, threads: int) -> float:
    """MB that three steps of `kind` add to resident memory at their peak, in a fresh process: after setup and one
    warm-up step, the kernel's high-water mark (VmHWM) is reset and read again after the steps."""
    code = (
        f"import sys, ctypes, gc, torch; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
        f"torch.set_num_threads({threads}); import bench_ini_step as b; fn = b.steps()[{kind!r}]; fn();"
        "gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0);"
        "status = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]);"
        "before = status('VmRSS'); open('/proc/self/clear_refs', 'w').write('5');"
        "[fn() for _ in range(3)]; print(status('VmHWM') - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


EPOCH_RUNS = {  # label: (processes, stage, extra flags)
    "train": (1, "train", []),
    "train-ini (eager)": (1, "train-ini", ["--compile", "off"]),
    "train-ini (compiled)": (1, "train-ini", ["--compile", "on"]),
    "train, 2 processes": (2, "train", []),
    "train-ini (compiled), 2 processes": (2, "train-ini", ["--compile", "on"]),
}


def time_epochs(threads: int) -> dict[str, float]:
    """Seconds of a full MNIST epoch (55,000 images, batch 128) of train and of train-ini through the CLI, in one
    process with `threads` threads or under torchrun with 2 processes of one thread each (DDP, gloo; the global
    batch stays 128). Each run trains 2 epochs and reports the second: steady state, after compiling."""
    out = {}
    for label, (processes, stage, extra) in EPOCH_RUNS.items():
        path = f"/tmp/bench_ini_{stage}_{processes}.h5"
        launch = (
            [sys.executable]
            if processes == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        )
        flags = ["--ood", "fashionmnist", "--diagnostic-images", "0"] if stage == "train-ini" else []
        env = {"OMP_NUM_THREADS": str(threads if processes == 1 else 1), "PATH": "/usr/bin:/bin"}
        result = subprocess.run(
            [
                *launch,
                str(ROOT / "cli.py"),
                stage,
                "--dataset",
                "mnist",
                "--epochs",
                "2",
                "--device",
                "cpu",
                "--out",
                path,
                *flags,
                *extra,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            raise SystemExit(result.stderr[-2000:])
        with h5py.File(path, "r") as f:
            out[label] = float(f["history/epoch_seconds"][1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument(
        "--epoch",
        action="store_true",
        help="also time full MNIST epochs of train and train-ini (eager, compiled, 2 processes)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the steps run (--epoch: the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = time_steps(args.rounds, args.iterations, args.device)
    median = {k: statistics.median(v) * 1000 for k, v in times.items()}
    if args.device == "cpu":
        memory = {k: peak_memory(k, args.threads) for k in times}
    else:
        memory = peak_device_memory(args.device)
    print(
        f"LeNet-5, MNIST batch 128, {args.device}, {args.threads} thread(s), "
        f"median of {args.rounds} interleaved rounds x {args.iterations}"
    )
    print(f"{'step':<10} {'ms':>8} {'min ms':>8} {'x plain':>8} {'peak MB':>8}")
    for kind in times:
        print(
            f"{kind:<10} {median[kind]:8.1f} {min(times[kind]) * 1000:8.1f} {median[kind] / median['plain']:8.2f} "
            f"{memory[kind]:8.1f}"
        )
    print(f"reference / fast: {median['reference'] / median['fast']:.2f}x")
    summary = {"median_ms": median, "peak_mb": memory}
    if args.epoch:
        summary["epoch_seconds"] = time_epochs(args.threads)
        for k, v in summary["epoch_seconds"].items():
            print(f"epoch {k}: {v:.1f} s")
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
