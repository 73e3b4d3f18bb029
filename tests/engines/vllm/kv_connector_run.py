# Run by test_kv_connector.py in its own process: python kv_connector_run.py OUT_JSON MODEL_DIR SHM_DIR
"""Run vLLM (CPU) with the resilient KV connector: A runs to completion and is checkpointed;
A' = A's prompt + its output, re-admitted with resilient_restore, must be an external cache hit
and continue like B (A's prompt with more tokens, never restored)."""
import json, os, sys, time


def main():
    out_path, model, base = sys.argv[1], sys.argv[2], sys.argv[3]
    from resilient_ep.engines.vllm.launcher import prepare_environment
    prepare_environment([])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    t0 = time.monotonic()
    llm = LLM(model=model, dtype="float32", enforce_eager=True, block_size=32, max_model_len=512,
              enable_prefix_caching=False, seed=0,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="ResilientKVConnector",
                  kv_connector_module_path="resilient_ep.engines.vllm.kv_connector",
                  kv_role="kv_both",
                  kv_connector_extra_config={"store": "shm", "base_dir": base, "interval_tokens": 32,
                                             "keep_on_finish": True}))
    start_s = time.monotonic() - t0
    prompt = list(range(100, 160))  # 60 tokens
    gen_a = 50
    def sp(n, params=None):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                              extra_args={"kv_transfer_params": params} if params else None)
    a = llm.generate([{"prompt_token_ids": prompt}], sp(gen_a, {"resilient_id": "req-A"}))[0]
    a_tokens = list(a.outputs[0].token_ids)
    time.sleep(0.5)  # the background save of A's last interval
    b = llm.generate([{"prompt_token_ids": prompt}], sp(gen_a + 16))[0]
    b_tokens = list(b.outputs[0].token_ids)
    t1 = time.monotonic()
    a2 = llm.generate([{"prompt_token_ids": prompt + a_tokens}], sp(16, {"resilient_restore": "req-A"}))[0]
    restore_s = time.monotonic() - t1
    files = sorted(os.listdir(os.path.join(base, "store-0"))) if os.path.isdir(os.path.join(base, "store-0")) else []
    json.dump({"start_s": start_s, "a": a_tokens, "b": b_tokens, "a2": list(a2.outputs[0].token_ids),
               "a2_num_cached_tokens": a2.num_cached_tokens, "restore_s": restore_s, "files": files},
              open(out_path, "w"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
