"""vLLM adapter of resilient-ep.

- ``plugin.register``: the ``vllm.general_plugins`` entry point (cheap, idempotent).
- ``cli_args``: ``--enable-resilience`` / ``--resilience-config`` / ``--resilience-set``.
- ``config``: ``additional_config["resilience"]`` -> the core's ``ResilienceConfig``.
- ``launcher.main``: ``resilient-ep serve MODEL --engine vllm ...``.
- ``status``: ``GET /resilience/status`` on the API server.
- ``worker``: the worker extension the status endpoint asks.
- ``patches``: what vLLM lacks, one module per ledger entry (``patches/`` at the repo root).

Importing this package imports no vLLM module.
"""
