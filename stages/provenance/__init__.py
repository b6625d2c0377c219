"""Proving a theft: the keyed watermark's secret and the evidence its marked answers leave, and the test that
names a stolen copy (the `verify` stage).

    keys      the secret key file (created 0600), its fingerprint
    evidence  marked and control queries, from a surrogate's transfer set or the serving ledger
    suspect   a model under suspicion as images -> top-1 and runner-up: .h5, TorchScript, ONNX or a served URL
    test      agreement with the marks against the controls' agreement, and its p-value
"""
