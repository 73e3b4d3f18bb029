"""SGLang adapter of resilient-ep.

- ``plugin.register``: the ``sglang.srt.plugins`` entry point (cheap, idempotent).
- ``cli_args``: ``--enable-resilience`` / ``--resilience-config`` / ``--resilience-set`` and
  ``Engine(resilience=...)``, through SGLang's ``HookRegistry``.
- ``config``: the settings -> the core's ``ResilienceConfig``; ``config.enable(server_args)``.
- ``launcher.main``: ``resilient-ep serve MODEL --engine sglang ...``.
- ``patches``: what SGLang lacks, one module per ledger entry (``patches/`` at the repo root).

Importing this package imports no SGLang module.
"""
