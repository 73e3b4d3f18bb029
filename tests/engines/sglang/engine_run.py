"""Child process of the SGLang engine tests: start ``sglang.Engine`` (CPU, fp32, greedy),
generate ``PROMPTS``, record the titles of the engine's processes, write JSON, shut down.

    python engine_run.py MODEL OUT.json '{"tp_size": 1}'

With ``"resilience": {...}`` in the JSON the engine is made through
``resilient_ep.engines.sglang.config.enable``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


def main() -> None:
    import psutil
    import sglang
    from sglang.srt.server_args import ServerArgs

    from sglang_harness import MAX_TOKENS, PROMPTS

    model, out, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    resilience = extra.pop("resilience", None)
    kw = dict(model_path=model, device="cpu", attention_backend="torch_native",
              disable_cuda_graph=True, dtype="float32", max_total_tokens=4096,
              max_running_requests=16, mem_fraction_static=0.3, log_level="error",
              random_seed=0)
    kw.update(extra)
    sa = ServerArgs(**kw)
    if resilience is not None:
        from resilient_ep.engines.sglang.config import enable

        enable(sa, resilience)
    llm = sglang.Engine(server_args=sa)
    try:
        outs = llm.generate(PROMPTS, {"temperature": 0.0, "max_new_tokens": MAX_TOKENS,
                                      "ignore_eos": True})
        kids = psutil.Process().children(recursive=True)
        titles = sorted(_title(p) for p in kids)
        res = {"ids": [o["output_ids"] for o in outs], "titles": titles}
    finally:
        llm.shutdown()
    with open(out, "w") as f:
        json.dump(res, f)


def _title(p) -> str:
    try:
        return p.cmdline()[0].split()[0] if p.cmdline() else p.name()
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
