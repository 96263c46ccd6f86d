"""The autotuner: an optuna study per (target, kernel, shape, threads) over the search space
of each tunable operator in the kernel registry (ops/registry.py), measurement in isolated
worker processes (or on a device through TVM's RPC), and the tuning records in
``schedules/records/`` (records.py, which the compiler reads without importing this package).

    worker.py     the isolated measuring process and its client (timeouts, crashes)
    rpc.py        measuring on a remote device through a TVM RPC server or tracker
    study.py      the optuna loop: ask, measure, tell, resume, confirm, record
    views.py      list / show / compare / plot / source of the records
"""
