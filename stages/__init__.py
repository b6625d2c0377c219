"""The pipeline. Each file at this level is one command of `cli.py`, with one public `run(...)` whose typed
signature is the command's flags:

    prepare    datasets to HDF5                      train      the undefended victim (baseline)
    train_ini  the InI victim                        steal      a model-stealing attack through a black box
    evaluate   metrics, the decision table, report   export     TorchScript / ONNX deploy
    serve      the HTTP prediction API               serve_key  an API key for `serve`
    verify     names a copy stolen from a watermarked victim

The code they share lives in packages named for a concern, imported one way (each only from those above it):

    core        HDF5 artifacts (atomic writes, provenance, schemas) and the flags stages share
    data        raw readers, prepared sets, and the generated near-distribution families
    training    the training loop, victim artifacts, torchrun ranks, TorchScript
    deploy      a victim with a posterior defense as one graph; ONNX export
    ini         Isolation and Induction: the objective, OOD batches, the training steps
    attacks     the thieves, the budgeted black box they query, steal's checkpoint, a remote victim
    evaluation  relabelling, budget curves, the decision table, the report and its plots
    serving     the prediction API: keys, limits, ledger, monitor, batching
    provenance  the evidence of a theft (marked answers) and the test that names a stolen copy
"""
