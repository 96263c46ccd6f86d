"""The autotuner: search spaces as data, an optuna study per (target, kernel, shape, threads),
measurement in isolated worker processes (or on a device through TVM's RPC), and the tuning
records in ``schedules/records/`` that the compiler picks up.

    space.py      knobs, their domains and the constraints between them
    templates.py  the tunable kernels: space, padded shape, PrimFunc, test case per operator
    measure.py    how a kernel is timed: weights streamed from DRAM or in cache
    worker.py     the isolated measuring process and its client (timeouts, crashes)
    rpc.py        measuring on a remote device through a TVM RPC server or tracker
    records.py    target fingerprints and the records files
    study.py      the optuna loop: ask, measure, tell, resume, confirm, record
    views.py      list / show / compare / plot / source of the records
"""
