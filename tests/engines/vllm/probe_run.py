"""Run the rejoin probe (``engines/vllm/probe.py``) inside a real vLLM worker and write what it
found as JSON (a test helper, run as its own process: one engine, in-process)."""

import glob
import json
import os
import sys


def probe_in_worker(worker, model_dir: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from resilient_ep.engines.vllm import probe
    from resilient_ep.engines.vllm.expert_weights import slot_params
    from resilient_ep.probe import PROBE_TOKENS, compare, expert_key, fingerprint, probe_input

    model = worker.model_runner.get_model()
    moe = [(n, m) for n, m in model.named_modules() if hasattr(m, "w13_weight")]
    routed = frozenset(id(p) for _, m in moe for p in m.parameters(recurse=False))
    dense = probe.dense_probe(model, routed)

    class Layer:
        def __init__(self, name, module):
            self.name, self.module = name, module

    class State:  # what expert_probe reads of experts.ExpertState
        backup, model_dir, disk_ok = None, None, False
        layers = [Layer(f"layer{i}", m) for i, (_, m) in enumerate(moe)]

        @staticmethod
        def settled_slots():
            return {e: e for e in range(int(moe[0][1].local_num_experts))}

    state = State()
    got = probe.expert_probe(state)
    weights = {}
    for f in glob.glob(os.path.join(model_dir, "*.safetensors")):
        weights.update(load_file(f))
    # the reference: each expert as the HF model computes it (SiLU-gated MLP), in plain torch
    ref = {}
    for i, _ in enumerate(moe):
        x = probe_input(expert_key(f"layer{i}", -1), (PROBE_TOKENS, int(moe[i][1].hidden_size)))
        for e in state.settled_slots():
            pre = f"model.layers.{i}.mlp.experts.{e}."
            g, u, d = (weights[pre + k + "_proj.weight"] for k in ("gate", "up", "down"))
            key = expert_key(f"layer{i}", e)
            ref[key] = fingerprint(key, (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T)
    # one slot's weights changed in place: its probe must differ
    w13 = dict(slot_params(moe[0][1]))["w13_weight"]
    with torch.no_grad():
        w13.data[2].mul_(1.01)
    perturbed = probe.expert_probe(state, [("layer0", 2), ("layer0", 3)])
    return {"dense_modules": sorted(dense["dense"]), "skipped": dense["skipped"],
            "pairs": got["pairs"], "sources": got["sources"],
            "vs_reference": compare(got["experts"], ref),
            "vs_perturbed": compare(got["experts"], perturbed["experts"],
                                    names=sorted(perturbed["experts"]))}


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process
    from resilient_ep.engines.vllm.launcher import prepare_environment

    prepare_environment([])
    from vllm import LLM

    llm = LLM(spec["model"], dtype="float32", enforce_eager=True, max_model_len=256)
    out = llm.collective_rpc(probe_in_worker, args=(spec["model"],))[0]
    with open(spec["out"], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
