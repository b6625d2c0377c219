"""The prediction API `serve` runs: the defended model behind HTTP, per principal budgets and limits, a query
ledger and extraction monitoring. Its parts, imported one way (app uses all the others but client):

    keys          principals and their hashed API keys (a TOML file)
    limits        token buckets and budget reservations
    ledger        the query ledger's interface (answers, spend, alerts) and its SQLite (WAL) backend
    ledger_pg     the PostgreSQL backend, one ledger shared by replicas
    backends      the backend a --ledger value names (a postgresql:// URL or a file)
    monitor       extraction signals per principal: volume, share of OOD-looking answers, class histogram, PRADA
    detectors     the class-histogram test and the global signals over all principals, which link keys
    model         the served graph (TorchScript, ONNX or victim.h5 with a defense) as numpy in, numpy out
    payload       request decoding and validation, answer encoding, API errors
    batcher       micro-batching of concurrent requests into one forward pass
    app           the FastAPI application and its Prometheus metrics
    watermark     keyed marks on answers (outside the served graph) and their evidence in the ledger
    client        the other end: a served victim as `steal --target` queries it
    launch        `serve` in a subprocess on a free loopback port (tests, benchmarks, experiments)
    throwaway_pg  a scratch PostgreSQL server (initdb, pg_ctl) for the tests and the serving benchmark
"""
