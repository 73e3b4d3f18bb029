"""The user-facing applications, on top of the reference runtime and the core: the
``resilient-ep`` command (:mod:`.cli`) and what its subcommands run (:mod:`.plan`,
:mod:`.demo`, :mod:`.server`, :mod:`.bench_failover`, :mod:`.bench_kv`).

Apps import the runtime, the core and (lazily) the engines; nothing below imports an app.
"""
