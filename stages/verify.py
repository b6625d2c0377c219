"""Name a stolen copy: query a suspect model on the images whose answers carried the watermark's marks and on as
many unmarked control images of the same evidence, and test whether it agrees with the marks more than with the
class the key would have marked (DAWN, Szyller et al., 2021; docs/method.md, "Watermark").

Reads the evidence (a surrogate.h5 whose transfer set holds marks, or the serving ledger) and the suspect (a .h5,
TorchScript, ONNX or a served URL); writes `verification.h5`: the verdict, the p-value, the counts and the
evidence's provenance; with `--null-keys`, the same tests under fake keys beside them (a calibration check).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from models.params import UserError
from stages.core.artifacts import prepare_output, write_artifact
from stages.deploy import watermark_key as _keys
from stages.provenance import evidence as _evidence
from stages.provenance import null_keys as _null
from stages.provenance import significance
from stages.provenance import suspect as _suspect
from stages.serving.ledger import POSTGRES

console = Console(stderr=True)


def run(
    suspect: Annotated[
        str,
        typer.Option(
            help="The model under suspicion: a surrogate or victim .h5, a TorchScript .pt or .onnx file (programs: "
            "only files you trust), or the URL of a served model (with --api-key)."
        ),
    ],
    evidence: Annotated[
        str,
        typer.Option(
            help="The marked answers: the serving ledger (ledger.sqlite, or the postgresql://... URL its replicas "
            "share; read only) or a surrogate.h5 stolen from the watermarked victim (its transfer set holds the marks)."
        ),
    ],
    key: Annotated[
        Optional[Path],
        typer.Option(
            help="The watermark's key file: checks that the evidence's marks were made with it (fingerprint, and "
            "every marked image's keyed draw). Never recorded."
        ),
    ] = None,
    principal: Annotated[
        Optional[str], typer.Option(help="Only this principal's marked answers from the ledger.")
    ] = None,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="INI_API_KEY", help="The API key for a URL --suspect; never recorded.")
    ] = None,
    null_keys: Annotated[
        int,
        typer.Option(
            min=0,
            max=100_000,
            help="Also run the tests under this many fake keys on the queries the real key left unmarked (a "
            "transfer set's evidence, with --key; the suspect answers every such query, a served one at its cost): "
            "the share of fake keys whose p is at or below the real key's. A check that the p-value is calibrated "
            "for this evidence and suspect, resolving no share below 1/N; the verdict stays the exact p-value.",
        ),
    ] = 0,
    alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="A suspect is named stolen when the p-value is below this.")
    ] = significance.ALPHA,
    out: Annotated[Path, typer.Option(help="Output verification HDF5.")] = Path("artifacts/verification.h5"),
) -> Path:
    """Test whether a suspect model was trained on the watermarked victim's answers; write verification.h5."""
    started = time.time()
    out = prepare_output(out)
    ev = _evidence.load(evidence, principal)
    if null_keys and key is None:
        raise UserError("--null-keys needs --key: the real key's keyed classes give the victim's top-1 back")
    if null_keys and ev.source["kind"] != "transfer set":
        raise UserError("--null-keys needs a transfer set's evidence: a ledger keeps only some unmarked answers")
    if key is not None:
        _evidence.check_key(ev, _keys.load(key))
    model = _suspect.open_suspect(suspect, api_key)
    if model.input_shape != ev.input_shape or model.num_classes != ev.num_classes:
        raise UserError(
            f"--suspect {suspect} takes {list(model.input_shape)} images into {model.num_classes} classes; the "
            f"evidence holds {list(ev.input_shape)} images of {ev.num_classes} classes"
        )
    marked_probs = _suspect.query(model, ev.marked_images)
    control_probs = _suspect.query(model, ev.control_images)
    outcome, marked_agree, control_agree = significance.decide(
        marked_probs, ev.marked_class, control_probs, ev.control_class, ev.mode, alpha
    )

    null, null_p = None, None
    if null_keys:
        pool = _null.transfer_pool(Path(evidence), _keys.load(key), ev)
        null_p = _null.outcomes(pool, [_suspect.query(model, pool.images)], _null.fake_keys(null_keys))[0, :, 2]
        null = _null.summarise(null_p, outcome.p_value)

    database = evidence.startswith(POSTGRES)  # recorded by its name (never a password), hashed by its rows
    params = dict(
        suspect=suspect,
        evidence=ev.source["path"] if database else evidence,
        principal=principal,
        alpha=alpha,
        key_checked=key is not None,
        null_keys=null_keys,
    )
    inputs = ([] if database else [Path(evidence)]) + ([Path(suspect)] if model.kind != "served" else [])
    with write_artifact(out, "verification", "verify", params, inputs, None, started) as f:
        f.attrs.update(outcome.to_dict())
        f.attrs.update(
            verdict="stolen" if outcome.stolen else "not shown",
            mode=ev.mode,
            key_fingerprint=ev.fingerprint,
            evidence=json.dumps(ev.source, sort_keys=True),
            suspect_kind=model.kind,
            suspect_sha256=model.sha256,
        )
        if null is not None:
            f.attrs.update(null.to_dict())
            f.create_dataset("null_p", data=null_p)  # each fake key's p (NaN: it marked too few)
        for name, values in (
            ("marked_class", ev.marked_class),
            ("marked_agree", marked_agree),
            ("suspect_marked_probs", marked_probs.astype(np.float32)),
            ("control_class", ev.control_class),
            ("control_agree", control_agree),
            ("suspect_control_probs", control_probs.astype(np.float32)),
        ):
            f.create_dataset(name, data=np.asarray(values))
    _summarise(outcome, null, ev, model, out)
    return out


def _summarise(
    o: significance.Outcome, null: Optional[_null.Null], ev: _evidence.Evidence, model: _suspect.Suspect, out: Path
) -> None:
    table = Table(title=f"verify: {model.name} against {ev.source['kind']} {ev.source['path']}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(
        "marked queries agreeing with the mark", f"{o.marked_agree} / {o.marked} ({o.marked_agree / o.marked:.1%})"
    )
    table.add_row(
        "control queries agreeing with the would-be mark",
        f"{o.control_agree} / {o.controls} ({o.control_agree / max(o.controls, 1):.1%})",
    )
    repeated = int(ev.source.get("marked_queries", o.marked)) - o.marked
    if repeated > 0:
        table.add_row("marked queries of a hashed image already counted (left out)", f"{repeated:,}")
    table.add_row("p, agreement (Fisher exact, one-sided)", f"{o.p_agreement:.3g}")
    table.add_row("p, keyed-class log-probability (Mann-Whitney U)", f"{o.p_score:.3g}")
    table.add_row("p-value (twice the smaller)", f"{o.p_value:.3g}")
    if null is not None:
        table.add_row(
            "fake keys with p at or below this one (calibration)",
            f"{null.share_at_or_below:.1%} of {null.keys} (p < 0.05 under {null.below_005:.1%}; KS p {null.ks_p:.2g})",
        )
    table.add_row("verdict", f"{'stolen' if o.stolen else 'not shown'} (alpha {o.alpha:g})")
    table.add_row("key fingerprint", ev.fingerprint)
    table.add_row("verification", str(out))
    console.print(table)
