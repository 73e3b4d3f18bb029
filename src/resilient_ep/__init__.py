"""resilient-ep: survive the loss of a rank in wide expert-parallel MoE inference.

The core (everything outside ``engines/``) never imports vLLM or SGLang. Import what you need
from its modules: ``resilient_ep.config``, ``.membership``, ``.layout``, ``.placement``,
``.routing``; the reference runtime lives in ``resilient_ep.runtime``, the ``resilient-ep``
command and its applications (plan, demo, server, benchmarks) in ``resilient_ep.apps``.
"""

__version__ = "0.1.0"
