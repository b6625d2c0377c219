"""The prediction API `serve` runs: the defended model behind HTTP, per principal budgets and limits, a query
ledger and extraction monitoring. Its parts, imported one way (app uses all the others but client):

    keys     principals and their hashed API keys (a TOML file)
    limits   token buckets and budget reservations
    ledger   the SQLite (WAL) query ledger: answers, spend, alerts
    monitor  extraction signals per principal: volume, share of OOD-looking answers, class histogram, PRADA
    detectors  the class-histogram test and the global signals over all principals, which link keys
    model    the served graph (TorchScript, ONNX or victim.h5 with a defense) as numpy in, numpy out
    payload  request decoding and validation, answer encoding, API errors
    batcher  micro-batching of concurrent requests into one forward pass
    app      the FastAPI application and its Prometheus metrics
    client   the other end: a served victim as `steal --target` queries it
"""
