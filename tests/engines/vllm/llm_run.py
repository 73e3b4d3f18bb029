"""Run ``LLM(...).generate`` greedily and write the token ids as JSON (a test helper, run as
its own process so that each engine configuration starts clean)."""

import json
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    from resilient_ep.engines.vllm.launcher import prepare_environment

    engine = spec["engine"]
    prepare_environment(["-tp", str(engine.get("tensor_parallel_size", 1))])
    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    llm = LLM(spec["model"], **engine)
    t1 = time.monotonic()
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    outs = llm.generate(spec["prompts"], params, use_tqdm=False)
    t2 = time.monotonic()
    from resilient_ep.engines.vllm import plugin

    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "start_s": t1 - t0, "generate_s": t2 - t1,
              "front_end_active": plugin.is_active()}
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    del llm


if __name__ == "__main__":
    main()
