"""Proving a theft: the evidence the watermark's marked answers leave (models/defenses.py, `Watermark`; its key:
stages/deploy/watermark_key.py), and the test that names a stolen copy (the `verify` stage).

    evidence      marked and control queries, from a surrogate's transfer set or the serving ledger
    suspect       a model under suspicion as images -> probabilities: .h5, TorchScript, ONNX or a served URL
    significance  agreement with the marks against the controls' agreement, and its p-value
    null_keys     the same tests under fake keys on the unmarked queries: the measured null (verify --null-keys)
"""
