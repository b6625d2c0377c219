"""A Markdown table of `verify` outcomes, one row per verification.h5 (docs/results.md, "Proving a theft"): the
suspect and its stealing accuracy where it is a surrogate, the evidence, the marked and control counts and
agreements, both p-values and the verdict; with --summary, the count named stolen and the p-value quantiles.

    python experiments/verification_table.py artifacts/verification*.h5 [--summary]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stages, not an installed copy

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from stages.core.artifacts import attr_json, open_artifact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="*")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    rows, ps = [], []
    for path in args.files:
        with open_artifact(path, "verification") as f:
            a, params, evidence = f.attrs, attr_json(f, "params"), attr_json(f, "evidence")
            suspect = Path(params["suspect"])
            accuracy = ""
            if a["suspect_kind"] == "surrogate":
                with h5py.File(suspect, "r") as s:
                    accuracy = f"{s.attrs['stealing_accuracy']:.1%}"
            rows.append(
                f"| {suspect.stem} | {accuracy} | {Path(evidence['path']).stem} | {a['marked']} | "
                f"{a['marked_agree']} | {a['control_agree']} | {a['p_agreement']:.2g} | {a['p_score']:.2g} | "
                f"{a['p_value']:.2g} | {a['verdict']} |"
            )
            ps.append(float(a["p_value"]))
    if args.summary:
        if not ps:
            print("no verifications")
            return
        ps = np.array(ps)
        print(f"{len(ps)} verifications; named stolen: {int((ps < 1e-6).sum())}; p < 0.05: {int((ps < 0.05).sum())}")
        q = np.quantile(ps, [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
        print("p-value min / 10 % / 25 % / median / 75 % / max: " + " / ".join(f"{v:.3g}" for v in q))
        return
    print(
        "| suspect | stealing acc. | evidence | marked | agree (marked) | agree (controls) | p agreement | p score |",
        end="",
    )
    print(" p | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
