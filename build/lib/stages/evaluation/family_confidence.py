"""How sure a victim is on near-distribution images, beside its own test images: the mean top probability, the
share of answers above CONFIDENT and the class answered most. A family the victim is as sure on as on its own data
reads as that data to it; a family that does not read so is near, not a disguised copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.attacks import blackbox as _blackbox
from stages.data import prepared as _data

CONFIDENT = 0.9


def measure(graph: torch.nn.Module, images: torch.Tensor, device: str = "cpu") -> dict[str, float]:
    """Statistics of the victim graph's answers (probabilities) on uint8 images already shaped for it."""
    probs = _blackbox.predict(graph, _data.to_float(images), device)
    top, answer = probs.max(1)
    counts = torch.bincount(answer, minlength=probs.shape[1])
    return dict(
        images=len(images),
        mean_top=float(top.mean()),
        confident=float((top > CONFIDENT).float().mean()),
        top_class=int(counts.argmax()),
        top_class_share=float(counts.max()) / max(1, len(images)),
    )


def table(
    victim: Path, datasets: list[str], split: str = "test", limit: int | None = None, device: str = "cpu"
) -> list[dict]:
    """One row for the victim's own `split`, then one per dataset (name or prepared file), each converted to the
    victim's input shape; `limit` caps the images per row."""
    graph, info = _blackbox.open_victim(Path(victim), device)
    rows = []
    for name in [info.dataset_path, *datasets]:
        data = _data.load(name, splits=(split,))
        images = _data.fit_images(data.splits[split][0][:limit], info.input_shape)
        row = measure(graph, images, device)
        row.update(dataset=data.name, own=not rows, top_class_name=info.classes[row["top_class"]])
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    """Plain-text table, one line per row (for logs and test output)."""
    lines = [f"{'data':<22} {'images':>7} {'mean top':>9} {'> ' + str(CONFIDENT):>7} {'most answered':>18}"]
    for r in rows:
        lines.append(
            f"{r['dataset'] + (' (own)' if r['own'] else ''):<22} {r['images']:>7} {r['mean_top']:>9.3f} "
            f"{r['confident']:>7.1%} {r['top_class_name'] + ' ' + format(r['top_class_share'], '.0%'):>18}"
        )
    return "\n".join(lines)
