"""`serve` against clients that know its monitor, over a real socket on 127.0.0.1: bad input at the edge (lying .npy
headers, deeply nested JSON, nonsense settings), judgement before a new key's answers leave, the class-histogram
alert with and without a declared prior, the global detectors against keys that each stay below --min-images, and the
monitor's windows across a restart."""

from __future__ import annotations

import collections
import io
import json
import math
import sqlite3
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke
from numpy.lib import format as npformat
from scipy.stats import binom
from served import served_world
from test_serve import Server, npy

from stages import serve_key, train
from stages.core.artifacts import open_artifact
from stages.serving import detectors
from stages.serving import monitor as _monitor

NPY = "application/x-npy"
SYBILS = 12
PRINCIPALS = {  # name: budget, rate, burst, action, prior
    "spare": (100_000, 10_000.0, 10_000.0, "log", None),
    "greedy": (100_000, 10_000.0, 10_000.0, "block", None),
    "form": (100_000, 10_000.0, 10_000.0, "log", "0,0.5,0,0,0,0,0,0.5,0,0"),
    "form-undeclared": (100_000, 10_000.0, 10_000.0, "log", None),
    "patient": (100_000, 10_000.0, 10_000.0, "log", None),
    "hasty": (100_000, 10_000.0, 10_000.0, "block", None),
    **{f"sybil-{i}": (100_000, 10_000.0, 10_000.0, "block", None) for i in range(SYBILS)},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return served_world(tmp_path_factory.mktemp("watch"), PRINCIPALS, split=600)


@pytest.fixture(scope="module")
def server(world):
    s = Server(world["victim"], world["keys"], world["root"] / "ledger.sqlite", "--global-action", "block")
    yield s
    s.stop()


def alerts(ledger: Path, name: str, seconds: float = 10.0) -> list[tuple]:
    deadline = time.monotonic() + seconds
    while True:
        with sqlite3.connect(ledger) as db:
            rows = db.execute(
                "SELECT signal, value, threshold, queries, action, details FROM alerts WHERE principal = ? ORDER BY id",
                (name,),
            ).fetchall()
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def light_copies(images: np.ndarray, copies: int, seed: int, repeats: int = 0) -> np.ndarray:
    """Each image, `repeats` more times unchanged, then `copies` light variants: shifted by up to 2 px (zeros
    shifted in) with up to +-12 grey levels of noise."""
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        out += [image] * (1 + repeats)
        for _ in range(copies):
            dy, dx = rng.integers(-2, 3, 2)
            padded = np.pad(image, ((0, 0), (2, 2), (2, 2)))
            moved = padded[:, 2 + dy : 2 + dy + image.shape[1], 2 + dx : 2 + dx + image.shape[2]]
            out.append(np.clip(moved.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def lying_header(shape: tuple[int, ...]) -> bytes:
    """A .npy header claiming `shape` (uint8), followed by 1 KB of data."""
    buffer = io.BytesIO()
    npformat.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 1024


def test_bad_input_at_the_edge_is_refused_from_the_header_and_nesting_is_not_a_500(world, server):
    with server.client(world["tokens"]["spare"]) as c:
        started = time.perf_counter()
        r = c.post("/v1/predict", content=lying_header((10**8, 1, 28, 28)), headers={"Content-Type": NPY})
        assert r.status_code == 413 and "at most 1024" in r.json()["error"], r.text
        assert time.perf_counter() - started < 5.0  # no 73 GiB allocation was attempted
        r = c.post("/v1/predict", content=lying_header((1000, 1, 28, 28)), headers={"Content-Type": NPY})
        assert r.status_code == 422 and "declares" in r.json()["error"], r.text  # 1000 images in 1 KB
        r = c.post("/v1/predict", content=lying_header((10**8, 3, 9, 9)), headers={"Content-Type": NPY})
        assert r.status_code == 422 and "does not match" in r.json()["error"]
        nested = b'{"images": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        r = c.post("/v1/predict", content=nested, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"] == "body is not valid JSON"
        assert c.get("/healthz").json() == {"status": "ok"}
        usage = c.get("/v1/usage").json()
        assert usage["spent"] == 0 and usage["reserved"] == 0


def test_serve_refuses_nonsense_watch_settings_in_one_line(world, tmp_path):
    base = ["serve", "--model", world["victim"], "--keys", world["keys"], "--ledger", tmp_path / "l.sqlite"]
    for flags, words in [
        (["--throttle-factor", "0"], "throttle"),
        (["--throttle-factor", "-1"], "throttle"),
        (["--global-window", "0"], "global-window"),
        (["--link-alpha", "0"], "link-alpha"),
        (["--link-alpha", "1e-9"], "link-alpha"),
        (["--min-images", "500"], "min-images"),
        (["--duplicate-distance", "-0.1"], "duplicate-distance"),
        (["--duplicate-distance", "2"], "duplicate-distance"),
    ]:
        assert words in assert_one_line_error(invoke(*base, *flags)), flags
    wrong = tmp_path / "keys.toml"
    serve_key.run("three", wrong, prior="0.2,0.3,0.5")
    assert "3 shares, the model has 10 classes" in assert_one_line_error(
        invoke("serve", "--model", world["victim"], "--keys", wrong, "--ledger", tmp_path / "l.sqlite")
    )
    assert "summing to 1" in assert_one_line_error(invoke("serve-key", "x", "--keys", wrong, "--prior", "0.5,0.6"))
    assert "numbers" in assert_one_line_error(invoke("serve-key", "y", "--keys", wrong, "--prior", "a,b"))
    assert not (tmp_path / "l.sqlite").exists()


def test_a_new_key_gets_nothing_past_min_images_before_its_judgement(world, server):
    """One request of 1,000 OOD-looking images: the monitor judges it at image 50 and blocks the key before the
    answers leave, so the key receives none (the forward pass ran: the images stay counted)."""
    with server.client(world["tokens"]["greedy"]) as c:
        r = c.post("/v1/predict", content=npy(noise(1000, 1)), headers={"Content-Type": NPY})
        assert r.status_code == 403 and "blocked" in r.json()["error"], r.text
        assert c.post("/v1/predict", content=npy(noise(5, 2)), headers={"Content-Type": NPY}).status_code == 403
    own = [a for a in alerts(server_ledger(world), "greedy") if not a[0].startswith("linked:")]
    assert own[0][0] == "ood_share" and own[0][3] == 50 and own[0][4] == "block"
    with sqlite3.connect(server_ledger(world)) as db:
        assert db.execute("SELECT spent FROM principals WHERE name = 'greedy'").fetchone()[0] == 1000


def test_after_an_alert_no_request_is_answered_past_the_one_it_was_raised_on(world, tmp_path):
    """A `block` key already judged (60 in-distribution images) sends 200 OOD-looking images, answered, on which
    its OOD share alerts; its next request, sent as soon as that answer arrives, waits for the judgement and is
    refused: it does not slip out while the monitor is still judging the one before."""
    server = Server(world["victim"], world["keys"], tmp_path / "ledger.sqlite")
    try:
        with server.client(world["tokens"]["hasty"]) as c:
            post = lambda x: c.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY})  # noqa: E731
            assert post(world["test"][:60]).status_code == 200
            assert post(noise(200, 5)).status_code == 200  # answered: the key was judged before it
            late = post(noise(5, 6))
            assert late.status_code == 403 and "blocked" in late.json()["error"], late.text
        own = alerts(tmp_path / "ledger.sqlite", "hasty")
        assert own[0][0] == "ood_share" and 60 < own[0][3] <= 260 and own[0][4] == "block", own
    finally:
        server.stop()


def server_ledger(world) -> Path:
    return world["root"] / "ledger.sqlite"


def test_a_declared_prior_spares_the_imbalanced_client_the_undeclared_one_is_alerted(world, tmp_path):
    """A form reader sending only 1s and 7s, with and without its declared prior, to a server whose global alerts
    only log (under --global-action block the young cohort's class histogram would block the undeclared one)."""
    ledger = tmp_path / "ledger.sqlite"
    server = Server(world["victim"], world["keys"], ledger)
    ones_and_sevens = world["test"][np.isin(world["labels"], (1, 7))][:120]
    for name in ("form", "form-undeclared"):
        with server.client(world["tokens"][name]) as c:
            for start in range(0, len(ones_and_sevens), 20):
                r = c.post(
                    "/v1/predict", content=npy(ones_and_sevens[start : start + 20]), headers={"Content-Type": NPY}
                )
                assert r.status_code == 200, (name, r.text)
    undeclared = alerts(ledger, "form-undeclared")
    declared = alerts(ledger, "form", seconds=1.0)
    server.stop()
    assert [a[0] for a in undeclared if not a[0].startswith("linked:")] == ["classes"]
    assert undeclared[0][1] > undeclared[0][2]
    assert declared == []


def test_keys_each_under_min_images_are_seen_globally_and_blocked(world, server):
    """SYBILS keys of 30 OOD-looking images each: no key is judged on its own (30 < --min-images 50), the young
    cohort's OOD share alerts, and every key of the campaign is linked and blocked (--global-action block, and
    the keys' own action block: a key's own action caps the global one)."""
    answered = 0
    for i in range(SYBILS):
        with server.client(world["tokens"][f"sybil-{i}"]) as c:
            r = c.post("/v1/predict", content=npy(noise(30, 100 + i)), headers={"Content-Type": NPY})
            answered += len(r.json()["answers"]) if r.status_code == 200 else 0
        time.sleep(0.05)
    ledger = server_ledger(world)
    campaign = alerts(ledger, "*")
    assert campaign and {"cohort_ood", "global_ood"} & {a[0] for a in campaign}
    blocked = 0
    for i in range(SYBILS):
        own = alerts(ledger, f"sybil-{i}", seconds=2.0)
        assert own and all(a[0].startswith("linked:") for a in own)  # never alerted on its own
        with server.client(world["tokens"][f"sybil-{i}"]) as c:
            blocked += c.get("/v1/usage").status_code == 403
    assert blocked == SYBILS
    assert answered < SYBILS * 30  # the later keys were linked, and blocked, before their answers left


def test_a_restart_refills_the_ood_window_from_the_ledger(world, tmp_path):
    """40 OOD-looking images, a restart, 10 more: the OOD-share alert fires at query 50, counted across the restart
    (the window was refilled from the ledger's answers)."""
    ledger = tmp_path / "ledger.sqlite"
    first = Server(world["victim"], world["keys"], ledger)
    with first.client(world["tokens"]["patient"]) as c:
        assert c.post("/v1/predict", content=npy(noise(40, 7)), headers={"Content-Type": NPY}).status_code == 200
    first.stop()
    assert [a for a in alerts(ledger, "patient", seconds=0.5) if not a[0].startswith("linked:")] == []
    second = Server(world["victim"], world["keys"], ledger)
    with second.client(world["tokens"]["patient"]) as c:
        assert c.post("/v1/predict", content=npy(noise(10, 8)), headers={"Content-Type": NPY}).status_code == 200
    own = [a for a in alerts(ledger, "patient") if not a[0].startswith("linked:")]
    second.stop()
    assert own and own[0][0] == "ood_share" and own[0][3] == 50


def g_statistic(counts: np.ndarray, prior: np.ndarray) -> float:
    """The G-test's statistic by its definition, 2 sum_k n_k ln(n_k / (n p_k)) over the seen classes."""
    n = counts.sum()
    seen = counts > 0
    return float(2.0 * (counts[seen] * np.log(counts[seen] / (n * prior[seen]))).sum()) if n else 0.0


def test_the_class_histogram_test_keeps_its_false_alert_rate_on_multinomial_draws():
    """The G-test's chi-square cutoff at alpha 1e-3 (a level a few thousand draws can check) over windows of 50 and
    200 draws from the prior: the rate of crossings stays within a factor 3 of alpha."""

    rng = np.random.default_rng(0)
    prior = np.full(10, 0.1)
    cutoff = detectors.g_cutoff(1e-3, 10)
    for n in (50, 200):
        counts = rng.multinomial(n, prior, size=20_000).astype(np.float64)
        g = np.array([g_statistic(c, detectors.floored(prior)) for c in counts])
        assert (g > cutoff).mean() < 3e-3, n
    settings = _monitor.Settings()
    assert json.dumps(_monitor.asdict(settings))  # the settings serialise into the ledger's run record


def test_a_class_window_s_running_g_equals_the_g_test_of_its_counts():
    """50,000 classes drawn from a skewed prior into a window of 200, read against a form reader's floored prior
    after every class: the running G stays the G-test of the window's counts (no drift over the stream)."""
    rng = np.random.default_rng(3)
    prior = detectors.floored(np.array([0, 0.5, 0, 0, 0, 0, 0, 0.5, 0, 0]))
    window = detectors.ClassWindow(200, prior)
    for i, c in enumerate(rng.choice(10, size=50_000, p=[0.05, 0.3, 0.05, 0.05, 0.05, 0.05, 0.05, 0.3, 0.05, 0.05])):
        window.add(int(c))
        if i % 97 == 0 or i > 49_900:
            assert window.g() == pytest.approx(g_statistic(window.counts, prior), rel=1e-9, abs=1e-8)
    assert window.counts.sum() == 200 and window.g() > 100


def test_steal_through_many_keys_with_filler_records_its_moves(world, tmp_path):
    """steal --target-move sybil=20, mix=0.5 and paced=2000 over 6 keys: no key is answered more than 20 images,
    half of what the keys spent is filler the surrogate never sees, and the moves are in the surrogate's params."""
    keys = tmp_path / "keys.toml"
    names = [f"k{i}" for i in range(6)]
    secret = ",".join(serve_key.run(k, keys, 1000, 10_000.0, 10_000.0, "log") for k in names)
    ledger = tmp_path / "ledger.sqlite"
    server = Server(world["victim"], keys, ledger)
    out = tmp_path / "stolen.h5"
    result = invoke(
        "steal",
        "--target",
        server.url,
        "--api-key",
        secret,
        "--target-move",
        "sybil=20",
        "--target-move",
        "mix=0.5",
        "--target-move",
        "paced=2000",
        "--pool",
        world["data"],
        "--budget",
        1000,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--query-batch",
        16,
        "--device",
        "cpu",
        "--out",
        out,
        "--victim",
        world["victim"],
    )
    server.stop()
    assert result.exit_code == 0, result.stderr
    with sqlite3.connect(ledger) as db:
        spent = dict(db.execute("SELECT name, spent FROM principals").fetchall())
    with open_artifact(out, "surrogate") as f:
        received = int(f.attrs["queries"])
        params = json.loads(f.attrs["params"])
    assert params["target_move"] == {"per_key": 20, "mix": 0.5, "rate": 2000.0, "keys": 6}
    assert secret.split(",")[0] not in f"{params}"
    assert max(spent.values()) <= 20 and sum(v > 0 for v in spent.values()) == 6
    # 6 keys x 20 images, half of them filler once a first confident answer gives the filler its material
    assert received == 60 and 100 <= sum(spent.values()) <= 120
    assert "--target-move needs --target" in assert_one_line_error(
        invoke("steal", "--victim", world["victim"], "--pool", world["data"], "--target-move", "mix=0.5")
    )
    assert "sybil=PER_KEY" in assert_one_line_error(
        invoke(
            "steal",
            "--target",
            "http://127.0.0.1:9",
            "--api-key",
            "x",
            "--pool",
            world["data"],
            "--target-move",
            "swarm=3",
        )
    )


def send(server: Server, token: str, images: np.ndarray, batch: int = 100) -> None:
    with server.client(token) as c:
        for start in range(0, len(images), batch):
            r = c.post("/v1/predict", content=npy(images[start : start + batch]), headers={"Content-Type": NPY})
            assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def digits(mnist_small, tmp_path_factory):
    """A LeNet-5 victim trained 2 epochs on 800 real MNIST digits, its 200 test digits, and two `log` keys."""
    root = tmp_path_factory.mktemp("digits")
    victim = train.run(dataset=str(mnist_small), out=root / "victim.h5", epochs=2, batch_size=32, device="cpu")
    keys = root / "keys.toml"
    tokens = {name: serve_key.run(name, keys, 100_000, 10_000.0, 10_000.0, "log") for name in ("augmenting", "copycat")}
    with h5py.File(mnist_small, "r") as f:
        test = f["test/images"][()]
    return dict(root=root, victim=victim, keys=keys, tokens=tokens, test=test)


def test_near_duplicates_count_once_the_augmenting_client_is_spared_their_thief_is_not(digits):
    """On real digits: a client sending each test digit twice and a light variant (600 queries) raises no alert of
    its own, where counting every copy (--duplicate-distance 0) alerts it; a thief sending 50 noise images, each
    with 10 light variants, is alerted on its OOD share at its 50th query either way (5 distinct images, all
    OOD-looking)."""
    benign = light_copies(digits["test"], copies=1, seed=3, repeats=1)
    thief = light_copies(noise(50, 9), copies=10, seed=4)
    own = {}
    for distance in ("default", "0"):
        ledger = digits["root"] / f"ledger-{distance}.sqlite"
        flags = ["--duplicate-distance", distance] if distance != "default" else []
        server = Server(digits["victim"], digits["keys"], ledger, *flags)
        send(server, digits["tokens"]["augmenting"], benign)
        send(server, digits["tokens"]["copycat"], thief)
        server.stop()
        own[distance] = {
            name: [a for a in alerts(ledger, name, seconds=1.0) if not a[0].startswith("linked:")]
            for name in ("augmenting", "copycat")
        }
    assert own["default"]["augmenting"] == [], own["default"]["augmenting"]
    assert own["0"]["augmenting"], "every copy counted: the augmenting client should be alerted"
    for distance in ("default", "0"):
        first = own[distance]["copycat"][0]
        assert first[0] == "ood_share" and first[3] == 50, (distance, first)


def test_a_near_duplicate_is_a_shifted_noisy_copy_not_another_image_nor_a_sign_step():
    """Novelty on real-sized images: a copy shifted by 2 px with +-12 grey levels of noise is a near-duplicate,
    another image of the same kind and a sign step of 0.1 on every pixel (JBDA's lambda) are not."""
    rng = np.random.default_rng(0)
    digit = np.zeros((1, 28, 28), dtype=np.float32)
    digit[0, 6:22, 10:18] = rng.uniform(0.5, 1.0, (16, 8))
    other = np.zeros_like(digit)
    other[0, 8:20, 6:22] = rng.uniform(0.5, 1.0, (12, 16))
    moved = np.clip(np.roll(digit, (2, -2), axis=(1, 2)) + rng.uniform(-12, 12, digit.shape) / 255, 0, 1)
    step = np.clip(digit + 0.1 * np.sign(rng.standard_normal(digit.shape)), 0, 1)
    novelty = detectors.Novelty(200, detectors.DUPLICATE_DISTANCE)
    first = novelty.distinct(np.stack([digit, moved, step]).astype(np.float32))
    later = novelty.distinct(np.stack([other, digit, moved]).astype(np.float32))  # against the kept ones too
    assert first.tolist() == [True, False, True] and later.tolist() == [True, False, False]
    assert detectors.Novelty(200, 0.0).distinct(digit[None]).all()  # 0: every query is distinct


def uniform_monitor(**calibration) -> _monitor.Monitor:
    """An in-process monitor of 28 x 28 images, 10 classes: a uniform benign prior, tau 0.5, PRADA off."""
    base = dict(ood_threshold=0.5, prada_delta=0.0, images=1000, source="uniform", benign_ood_share=0.01)
    base |= dict(benign_prada_min=float("nan"), class_prior=[0.1] * 10)
    return _monitor.Monitor(_monitor.Settings(), _monitor.Calibration(**(base | calibration)), 28 * 28)


def answers(classes: np.ndarray) -> np.ndarray:
    """Confident answers (0.9) of the given classes."""
    out = np.full((len(classes), 10), 0.1 / 9)
    out[np.arange(len(classes)), classes] = 0.9
    return out


def test_a_cohort_alert_links_its_young_keys_not_an_old_key_that_merely_stands_out():
    """In-process: an old key whose last 200 answers are skewed enough to stand out at --link-alpha (G 35.6, between
    the link cutoff 27.9 and the alert cutoff 44.8) but not to alert, then three young keys of 40 answers of one
    class each: the young cohort's class histogram alerts and links the young keys, never the old one."""
    counts = np.array([36, 36, 20, 20, 20, 20, 12, 12, 12, 12])
    # every class spread evenly over the 200 (each prefix and each sliding window of the repeated cycle keeps the
    # shares), so the key's G grows to 35.6 and stays there
    cycle = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    cycle = cycle[np.argsort(np.concatenate([(np.arange(n) + 0.5) / n for n in counts]), kind="stable")]
    rng = np.random.default_rng(0)
    monitor = uniform_monitor()

    def images(n: int) -> np.ndarray:
        return rng.random((n, 1, 28, 28), dtype=np.float32)  # distinct: no near-duplicates

    found = monitor.observe("old", images(200), answers(cycle), now=0.0)
    watch = monitor.watches["old"]
    assert monitor.link_g < g_statistic(watch.classes.counts, watch.prior) < monitor.g_cutoff
    for i in range(3):
        found += monitor.observe(f"young-{i}", images(40), answers(np.full(40, 3)), now=1.0 + i)
        found += monitor.observe("old", images(20), answers(cycle[20 * i : 20 * (i + 1)]), now=1.5 + i)
    assert [a for a in found if a.get("scope") != "global"] == []  # the old key never alerts on its own
    cohort = [a for a in found if a.get("scope") == "global" and a["signal"] == "cohort_classes"]
    linked = {name for a in cohort for name in a["linked"]}
    assert cohort and linked == {"young-0", "young-1", "young-2"}, cohort


def _near_duplicates_one_by_one(requests: list[np.ndarray], size: int, distance: float) -> list[list[bool]]:
    """The definition, query by query in float64: distinct when no kept interior (the last `size` distinct
    queries) lies within the radius of any of its shifted views."""
    kept: list[np.ndarray] = []
    out = []
    for images in requests:
        views = detectors.shifted(images.astype(np.float64))
        radius = distance * math.sqrt(views.shape[2])
        flags = []
        for view in views:
            near = any(np.sqrt(((view - k) ** 2).sum(1)).min() < radius for k in kept)
            flags.append(not near)
            if not near:
                kept = [*kept, view[(len(view) - 1) // 2]][-size:]
        out.append(flags)
    return out


@pytest.mark.parametrize("size", [200, 5])
def test_near_duplicates_found_in_chunks_match_the_query_by_query_definition(size):
    """Requests of 1 to 150 digits-like images, a third of them shifted noisy copies of earlier ones (of the same
    request, across chunk borders, or of earlier requests), with a memory that the requests overrun (5) or not."""
    rng = np.random.default_rng(3)
    originals = np.zeros((60, 1, 28, 28), dtype=np.float32)
    for image in originals:
        top, left = rng.integers(3, 12, 2)
        image[0, top : top + 14, left : left + 10] = rng.uniform(0.3, 1.0, (14, 10))
    pool = []
    for i in range(400):
        base = originals[rng.integers(0, 20 if i % 3 else 60)]
        shift = rng.integers(-2, 3, 2)
        noise = rng.uniform(-12, 12, base.shape) / 255 if i % 3 else 0.0
        pool.append(np.clip(np.roll(base, tuple(shift), axis=(1, 2)) + noise, 0, 1).astype(np.float32))
    pool = np.stack(pool)
    cuts = np.cumsum([1, 150, 1, 3, 1, 70, 64, 65, 1, 1, 47])
    requests = np.split(pool, cuts[cuts < len(pool)])
    novelty = detectors.Novelty(size, detectors.DUPLICATE_DISTANCE)
    got = [novelty.distinct(r).tolist() for r in requests]
    want = _near_duplicates_one_by_one(requests, size, detectors.DUPLICATE_DISTANCE)
    assert got == want
    flags = sum(want, [])
    assert 0.05 < 1 - np.mean(flags) < 0.9, np.mean(flags)  # the data holds both kinds


def _prada_one_by_one(queries: np.ndarray, classes: np.ndarray, settings) -> list:
    """PRADA's Algorithm 1 query by query in float64, as the definition: (W, distances read) or None per query."""
    kept: list[tuple[np.ndarray, int]] = []  # G, the last prada_window kept queries
    by_class: dict[int, list[float]] = collections.defaultdict(list)
    growth: dict[int, float] = collections.defaultdict(float)
    distances: collections.deque = collections.deque(maxlen=settings.prada_window)
    fresh, out = 0, []
    for x, c in zip(queries.astype(np.float64), classes.tolist(), strict=True):
        same = [k for k, kc in kept if kc == c]
        keep = not same
        if same:
            d = min(float(np.sqrt(((k - x) ** 2).sum())) for k in same)
            if d == 0.0:
                out.append(None)
                continue
            distances.append(d)
            fresh += 1
            if d > growth[c]:
                keep = True
                by_class[c] = [*by_class[c], d][-settings.prada_window :]
                growth[c] = max(growth[c], float(np.mean(by_class[c]) - np.std(by_class[c])))
        if keep:
            kept = [*kept, (x, c)][-settings.prada_window :]
        if len(distances) >= settings.prada_min and fresh >= settings.prada_every:
            fresh = 0
            d = np.array(distances)
            out.append((_monitor.shapiro_w(d[np.abs(d - d.mean()) <= 3.0 * d.std()]), len(d)))
        else:
            out.append(None)
    return out


@pytest.mark.parametrize("window", [2000, 60])
def test_prada_over_whole_requests_matches_the_query_by_query_definition(window):
    """Requests of 1 to 150 queries in 3 classes (natural-looking images, exact repeats, and JBDA-like sign steps of
    earlier queries), with a memory the requests overrun (60) or not: the same tests at the same queries, the same W."""
    rng = np.random.default_rng(5)
    base = rng.uniform(0, 1, (120, 64)).astype(np.float32) * (rng.uniform(0, 1, (120, 64)) < 0.3)
    queries, classes = [], []
    for i in range(600):
        j = int(rng.integers(0, 120))
        x = base[j] if i % 7 else base[int(rng.integers(0, 120))]
        if i % 5 == 0 and queries:
            x = np.clip(queries[int(rng.integers(0, len(queries)))] + 0.1 * np.sign(rng.standard_normal(64)), 0, 1)
        queries.append(x.astype(np.float32))
        classes.append(j % 3)
    queries, classes = np.stack(queries), np.array(classes)
    settings = _monitor.Settings(prada_window=window, prada_min=30, prada_every=10)
    prada = _monitor.Prada(settings, 64)
    cuts = np.cumsum([1, 150, 1, 3, 1, 70, 64, 65, 1, 1, 47, 100])
    got = [
        t for q, c in zip(np.split(queries, cuts), np.split(classes, cuts), strict=True) for t in prada.add_many(q, c)
    ]
    want = _prada_one_by_one(queries, classes, settings)
    assert [t is None for t in got] == [t is None for t in want]
    assert sum(t is not None for t in want) > 20 and sum(t is None for t in want) > 20
    for g, w in zip(got, want, strict=True):
        if w is not None:
            assert g[1] == w[1] and g[0] == pytest.approx(w[0], abs=1e-6)


def _steps_one_by_one(requests: list[tuple[np.ndarray, np.ndarray]], size: int) -> list[tuple[float, bool]]:
    """The definition in float64: each query against the last `size` distinct queries of its class before its
    request and its request's earlier ones of its class (nan for none), with whether the difference is a sign step;
    an exact repeat carries the distance and the sign step of the query it repeats and is not kept again."""
    kept: dict[int, list[tuple[np.ndarray, tuple[float, bool]]]] = collections.defaultdict(list)
    out = []
    for xs, cs in requests:
        xs = xs.astype(np.float64)
        mine: list[tuple[int, tuple[float, bool], bool]] = []  # (class, (distance, sign), kept) of the request's
        for i, c in enumerate(cs.tolist()):
            candidates = kept[c] + [(xs[j], mine[j][1]) for j in range(i) if cs[j] == c]
            if not candidates:
                mine.append((c, (float("nan"), False), True))
                continue
            d, y, inherited = min(
                ((float(np.sqrt(((xs[i] - y) ** 2).sum())), y, e) for y, e in candidates), key=lambda t: t[0]
            )
            own = (d, bool(detectors.sign_steps((xs[i] - y)[None])[0]))
            mine.append((c, inherited, False) if d == 0 else (c, own, True))
        out += [m for _, m, _ in mine]
        for x, (c, m, keep) in zip(xs, mine, strict=True):
            if keep:
                kept[c] = [*kept[c], (x, m)][-size:]
    return out


def test_steps_measured_per_request_match_the_query_by_query_definition():
    """Requests of 1 to 40 queries in 3 classes: natural-looking images, exact repeats of earlier ones (the distance
    and sign step of what they repeat) and sign steps of lambda 0.1 or 0.3 from earlier ones, with a memory of 30
    per class that the traffic overruns."""
    rng = np.random.default_rng(7)
    base = rng.uniform(0, 1, (200, 64)).astype(np.float32) * (rng.uniform(0, 1, (200, 64)) < 0.3)
    sent: list[np.ndarray] = []
    requests = []
    for n in [1, 40, 3, 17, 1, 25, 40, 2, 33, 9, 1, 40]:
        xs, cs = [], []
        for _ in range(n):
            j = int(rng.integers(0, 200))
            x = base[j]
            if sent and rng.random() < 0.2:
                x = sent[int(rng.integers(0, len(sent)))]  # an exact repeat of an earlier request's query
            elif sent and rng.random() < 0.3:
                step = rng.choice([0.1, 0.3])
                x = np.clip(sent[int(rng.integers(0, len(sent)))] + step * np.sign(rng.standard_normal(64)), 0, 1)
            xs.append(x.astype(np.float32))
            cs.append(j % 3)
        requests.append((np.stack(xs), np.array(cs)))
        sent += xs
    steps = detectors.Steps(30, 64, 3)
    measured = [steps.measure(xs, cs) for xs, cs in requests]
    got, signs = np.concatenate([d for d, _ in measured]), np.concatenate([s for _, s in measured])
    want = _steps_one_by_one(requests, 30)
    assert sum(d < 1.0 for d, _ in want) >= 10  # small steps were drawn
    assert sum(s and d > 1.2 for d, s in want) >= 5  # and wide ones (lambda 0.1 moves at most 0.8 here)
    np.testing.assert_allclose(got, [d for d, _ in want], rtol=1e-4, atol=1e-4)
    assert signs.tolist() == [s for _, s in want]


def test_sign_steps_at_any_lambda_are_told_from_real_digits_differences_and_brightness_shifts(mnist_small):
    """On real MNIST digits: the difference of each test digit from the nearest earlier one of its class is no sign
    step; a sign step of lambda 0.05 to 0.5 from a digit is one, in float and after rounding to grey levels; a
    brightness shift of a digit, and a copy with grey-level noise, are not."""
    with h5py.File(mnist_small, "r") as f:
        x, y = f["test/images"][()], f["test/labels"][()]
    flat = x.reshape(len(x), -1).astype(np.float32) / 255
    benign = []
    for c in range(10):
        group = flat[y == c]
        for i in range(1, len(group)):
            j = int(((group[:i] - group[i]) ** 2).sum(axis=1).argmin())
            benign.append(group[i] - group[j])
    assert len(benign) > 150 and not detectors.sign_steps(np.stack(benign)).any()
    rng = np.random.default_rng(0)
    for step in (0.05, 0.1, 0.3, 0.5):
        children = np.clip(flat + step * np.sign(rng.standard_normal(flat.shape)), 0, 1)
        assert detectors.sign_steps(children - flat).all()
        assert detectors.sign_steps(np.rint(children * 255) / 255 - flat).all()
    assert not detectors.sign_steps(np.clip(flat + 0.1, 0, 1) - flat).any()  # brighter
    assert not detectors.sign_steps(np.clip(flat + rng.integers(-12, 13, flat.shape) / 255, 0, 1) - flat).any()


def test_step_radii_put_real_digits_outside_and_their_sign_steps_inside(mnist_small):
    """On 800 real MNIST digits (a memory of 20 per class, so that they fill it): the radii at the 5 % quantile
    leave about 5 % of another 200 digits' distances under them, and a sign step of lambda 0.1 from an earlier
    digit (JBDA's move) under them for most classes."""
    with h5py.File(mnist_small, "r") as f:
        train_x, train_y = f["train/images"][()], f["train/labels"][()]
        test_x, test_y = f["test/images"][()], f["test/labels"][()]
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255  # noqa: E731
    radii, counts = detectors.step_radii(flat(train_x), train_y, 10, 0.05, size=20)
    assert min(counts) >= 100 and all(r > 0 for r in radii)
    radii = np.asarray(radii)
    steps = detectors.Steps(20, 784, 10)
    steps.measure(flat(train_x), train_y)  # the memory full of earlier digits
    benign, signs = steps.measure(flat(test_x), test_y)
    assert np.mean(benign < radii[test_y]) < 0.15 and not signs.any()
    # the parents: the digits the memory holds now, the last 20 of each class
    held = np.concatenate([np.flatnonzero(np.concatenate([train_y, test_y]) == c)[-20:] for c in range(10)])
    parents, classes = np.concatenate([flat(train_x), flat(test_x)])[held], np.concatenate([train_y, test_y])[held]
    rng = np.random.default_rng(0)
    children = np.clip(parents + 0.1 * np.sign(rng.standard_normal(parents.shape)), 0, 1).astype(np.float32)
    assert np.mean(steps.measure(children, classes)[0] < radii[classes]) > 0.8


@pytest.mark.parametrize("step", [0.1, 0.3])
def test_young_keys_stepping_from_each_other_s_queries_are_seen_and_linked_benign_young_keys_are_not(mnist_small, step):
    """In-process, radii as read on MNIST's val split: 12 young keys of 40 real digits each raise nothing; then
    young keys sending sign steps (lambda 0.1, under the radii; 0.3, beyond them) of those digits, 40 a key: the
    cohort's step count alerts at the first such key and links it, and every later one is linked at its first
    request, as is a fresh key re-asking the first one's steps; no benign key is linked."""
    with h5py.File(mnist_small, "r") as f:
        digits, labels = f["train/images"][:480], f["train/labels"][:480]
    images = digits.astype(np.float32)[:, None] / 255 if digits.ndim == 3 else digits.astype(np.float32) / 255
    monitor = uniform_monitor(step_radii=[3.47, 1.31, 3.57, 4.01, 3.12, 3.79, 2.95, 2.53, 3.83, 3.08])

    found = []
    for i in range(12):
        part = slice(40 * i, 40 * (i + 1))
        found += [(f"benign-{i}", a) for a in monitor.observe(f"benign-{i}", images[part], answers(labels[part]), 1.0)]
    assert found == []
    rng = np.random.default_rng(1)
    sent = []
    for i in range(6):
        part = slice(40 * i, 40 * (i + 1))
        sent.append(np.clip(images[part] + step * np.sign(rng.standard_normal(images[part].shape)), 0, 1))
        found += [(f"thief-{i}", a) for a in monitor.observe(f"thief-{i}", sent[-1], answers(labels[part]), 2.0 + i)]
    # a fresh key re-asking the steps the first thief key was refused: exact repeats carry their step
    found += [("retry", a) for a in monitor.observe("retry", sent[0], answers(labels[:40]), 9.0)]
    steps = [a for _, a in found if a.get("scope") == "global" and a["signal"] == "cohort_steps"]
    assert steps and not steps[0].get("continued") and steps[0]["linked"] == ["thief-0"], steps
    linked = {name for a in steps for name in a["linked"]}
    assert linked == {f"thief-{i}" for i in range(6)} | {"retry"}, found
    assert monitor.watches["thief-3"].cohort_k >= 30


@pytest.mark.parametrize("step", [0.1, 0.3])
def test_one_key_stepping_from_its_own_queries_is_alerted_a_key_of_real_digits_is_not(mnist_small, step):
    """In-process, radii as read on MNIST's val split: a key sending 800 real digits raises no `steps` alert; a key
    sending 100 digits, then sign steps (lambda 0.1, under the radii; 0.3, beyond them) of them, is alerted on its
    steps within its first 30 steps."""
    with h5py.File(mnist_small, "r") as f:
        digits, labels = f["train/images"][()], f["train/labels"][()]
    images = digits.astype(np.float32).reshape(len(digits), 1, 28, 28) / 255
    monitor = uniform_monitor(step_radii=[3.47, 1.31, 3.57, 4.01, 3.12, 3.79, 2.95, 2.53, 3.83, 3.08])
    found = [
        a
        for i in range(0, 800, 100)
        for a in monitor.observe("digits", images[i : i + 100], answers(labels[i : i + 100]), 1.0)
    ]
    assert [a for a in found if a["signal"] == "steps"] == [], found
    rng = np.random.default_rng(2)
    children = np.clip(images[:100] + step * np.sign(rng.standard_normal(images[:100].shape)), 0, 1)
    stream, classes = np.concatenate([images[:100], children]), np.concatenate([labels[:100], labels[:100]])
    found = [
        a
        for i in range(0, 200, 10)
        for a in monitor.observe("thief", stream[i : i + 10], answers(classes[i : i + 10]), 2.0)
    ]
    steps = [a for a in found if a["signal"] == "steps"]
    assert steps and 100 < steps[0]["queries"] <= 130, found
    assert len(monitor.watches["thief"].prada.measured) == 10  # one distance (or nan) per query of the last request


def watch_study():
    """experiments/serve_watch.py as a module (it imports serve_alerts beside it)."""
    import importlib
    import sys

    folder = str(Path(__file__).resolve().parents[1] / "experiments")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("serve_watch")


def test_the_watch_study_s_thieves_make_the_steal_commands_they_name(tmp_path):
    """Each row of THIEVES is one `steal` command line: its attack, answers, pool, seed and move; the monitor-off
    thief is the same command without the move; the knockoff cells keep the commands they were measured with."""
    study = watch_study()
    pools = {"near": "latin.h5", "far": "fashion.h5"}
    names = [t.name for t in study.THIEVES]
    assert len(names) == len(set(names)) == 26
    rows = {t.name: t for t in study.THIEVES}
    assert rows["sybil-soft-near"].steal(pools, 2000, 10, 0) == [
        *("--attack", "knockoff", "--label", "soft", "--pool", "latin.h5", "--budget", "2000", "--epochs", "10"),
        *("--seed", "0", "--target-move", "sybil=49", "--query-batch", "49"),
    ]
    assert rows["plain-hard-near"].steal(pools, 2000, 10, 2)[:4] == ["--attack", "knockoff", "--label", "hard"]
    assert rows["sybil-soft-far"].keys == 60 and rows["sybil-mix-soft-near"].keys == 120
    jbda = rows["sybil-mix-jbda-soft"].steal(pools, 2000, 10, 1)
    assert "--pool" not in jbda and jbda[jbda.index("--seed") + 1] == "1"  # its seeds: the victim's train split
    assert jbda[-6:] == ["--target-move", "sybil=49", "--target-move", "mix=0.5", "--query-batch", "24"]
    wide = rows["sybil-jbda-soft-step0_3"]
    assert wide.off == "jbda-soft-step0_3" and wide.steal(pools, 2000, 10, 0, monitor=False)[-2:] == [
        "--attack-param",
        "step=0.3",
    ]
    sparse = rows["plain-jbda-soft-step0_3-jitter0_2-sparse0_3"]
    assert sparse.off == "jbda-soft-step0_3-jitter0_2-sparse0_3" and sparse.steal(pools, 2000, 10, 0)[-2:] == [
        "--attack-param",
        "sparse=0.3",
    ]
    dfme = rows["plain-dfme-soft"].steal(pools, 2000, 10, 0)
    assert "--pool" not in dfme and dfme[-4:] == ["--batch-size", "64", "--attack-param", "width=16"]
    seeded = rows["sybil-seeded-soft-near"]
    assert seeded.off == "seeded-soft-near" and seeded.steal(pools, 2000, 10, 0, monitor=False)[-2:] == ["--seed", "0"]
    paced = rows["paced-mix-soft-near"].steal(pools, 2000, 10, 0)
    assert f"paced={study.PACE}" in paced and "mix=0.5" in paced and rows["paced-mix-soft-near"].keys == 1
    assert study.PACE * 3600 < 10_000  # under the default --volume-limit per --volume-window
    assert {t.off for t in study.THIEVES if t.move.startswith("paced")} == {"soft-near"}
    # a share of the monitor-off theft is counted above the untrained surrogate; no theft, nothing to reach
    assert study.goal(0.60, 0.10, 0.8) == pytest.approx(0.50) and study.goal(0.09, 0.10, 0.5) is None
    assert study.goal(0.0974, 0.0899, 0.5) is None  # DFME at 2,000 queries: a collapsed surrogate, no theft
    assert study.reached(dict(reached=False, queries=2940, keys=60)) == "not reached at 2,940 queries / 60 keys"
    over = [dict(reached=False, queries=q, keys=k) for q, k in ((2940, 60), (2880, 120))]
    assert study.reached_over(over) == "not reached at 2,880-2,940 queries / 60-120 keys"
    over[0] = dict(reached=True, answers=98, queries=98, keys=2)
    assert (
        study.reached_over(over)
        == "1 of 2 seeds: 98 queries / 2 keys; 1 of 2 seeds: not reached at 2,880 queries / 120 keys"
    )
    over[0] = "no monitor-off theft"
    assert (
        study.reached_over(over)
        == "1 of 2 seeds: no monitor-off theft; 1 of 2 seeds: not reached at 2,880 queries / 120 keys"
    )


def test_filler_beside_float_queries_stays_in_the_unit_range():
    """A mixing thief whose queries leave the 8-bit grid (JBDA's steps) after 8-bit ones: its filler, drawn from
    both, travels as float pixels in [0, 1] with the queries, never as 0-255 values."""
    from stages.serving.client import Endpoint, Moves

    sent = []

    def answer(batch: np.ndarray) -> np.ndarray:
        sent.append(batch)
        return np.tile(np.eye(10, dtype=np.float32)[3], (len(batch), 1))  # every answer confident

    endpoint = Endpoint("http://127.0.0.1:9", "k", 100, moves=Moves(mix=0.5))
    endpoint._post = answer
    grid = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28)).astype(np.float32) / 255.0
    endpoint(torch.from_numpy(grid))  # 8-bit queries: sent as uint8
    stepped = np.clip(grid + 0.1, 0, 1)  # off the grid: sent as float
    for _ in range(2):
        answers = endpoint(torch.from_numpy(stepped))
        stepped = np.clip(stepped - 0.03, 0, 1)
    assert sent[0].dtype == np.uint8 and answers.shape == (8, 10)
    for batch in sent[1:]:
        assert batch.dtype == np.float32 and len(batch) == 16 and 0.0 <= batch.min() and batch.max() <= 1.0


def test_the_offline_step_tests_read_a_step_s_peak_and_spread_and_the_second_tier_s_first_alert():
    """experiments/step_tests.py: a query's difference from its nearest earlier one of its class, once the class's
    memory is full (an exact repeat left out), as its L-infinity, changed share and L2; and the first answer at which
    a window of flags holds too many for Binomial(n, q) at alpha."""
    watch_study()  # experiments/ on the path
    import step_tests

    rng = np.random.default_rng(0)
    memory = rng.integers(0, 2, (detectors.step_memory(1), 100)).astype(np.float32)  # whole-pixel differences
    parent = np.full(100, 0.5, np.float32)
    child = parent + 0.1 * np.where(np.arange(100) < 30, 1.0, 0.0) - 0.1 * (np.arange(100) >= 90)
    x = np.concatenate([memory, parent[None], child[None], child[None]])
    peak, dense, l2, cls = step_tests.nearest(x, np.zeros(len(x), dtype=np.int64), 1)
    # the parent's nearest is a binary image (a whole-pixel change); the child's is its parent; the repeat is left out
    assert len(peak) == 2 and cls.tolist() == [0, 0]
    assert peak[1] == pytest.approx(0.1) and dense[1] == pytest.approx(0.4) and l2[1] == pytest.approx(np.sqrt(0.4))
    assert peak[0] == pytest.approx(0.5) and dense[0] == 1.0
    assert step_tests.first_alert(np.zeros(500, dtype=bool), 0.1) is None
    flags = rng.random(500) < 0.5
    at = step_tests.first_alert(flags, 0.1)
    s = step_tests.SETTINGS
    assert at is not None and s.min_images <= at < 500
    window = flags[max(0, at - s.ood_window) : at]
    assert binom.sf(window.sum() - 1, len(window), 0.1) < s.alpha
    before = flags[max(0, at - 1 - s.ood_window) : at - 1]
    assert at == s.min_images or binom.sf(before.sum() - 1, len(before), 0.1) >= s.alpha
