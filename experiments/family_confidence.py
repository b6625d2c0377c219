"""A victim's confidence on near-distribution families beside its own test images, as a table on stderr: mean top
probability, share of answers above 0.9, the class answered most (stages/evaluation/family_confidence.py).

    python experiments/family_confidence.py artifacts/victim.h5 artifacts/data/glyphs.h5 pen-strokes [--limit 4000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stages, not an installed copy

from stages.core.artifacts import UserError  # noqa: E402
from stages.evaluation import family_confidence as confidence  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("victim", type=Path, help="victim.h5 or a deployed victim.pt")
    parser.add_argument("data", nargs="+", help="prepared datasets (.h5) or dataset names")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, default=None, help="images per dataset (default: the whole split)")
    args = parser.parse_args()
    try:
        rows = confidence.table(args.victim, args.data, args.split, args.limit)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(confidence.format_rows(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
