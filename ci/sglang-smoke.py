#!/usr/bin/env python
"""Smoke run of the CPU-only SGLang venv made by ``ci/setup-sglang.sh`` (by hand; CI runs the
SGLang adapter's tests instead, ``tests/engines/sglang``).

    .venv-sglang/bin/python ci/sglang-smoke.py all --model-dir /tmp/tiny-qwen3-moe

    python smoke.py build  [--model-dir DIR]          # tiny random Qwen3-MoE + tokenizer
    python smoke.py engine [--model-dir DIR] [--tp N] # sglang.Engine, greedy 8 tokens x 2 prompts
    python smoke.py server [--model-dir DIR] [--port 30011]  # launch_server + curl /v1/completions
    python smoke.py all    [--model-dir DIR]          # build, engine tp=1, engine tp=2, server

Everything is local: the model has random weights (fixed seed) and the tokenizer is a
byte-level BPE trained on a few sentences.  Every child process is bounded by a timeout.
Exit status 0 only when every requested step passed.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "resilient-ep-sglang-smoke", "tiny-qwen3-moe")
PROMPTS = ["The quick brown fox", "Elastic expert parallel serving on a CPU"]
MAX_NEW_TOKENS = 8

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Elastic expert parallel serving keeps running when a rank fails.",
    "A mixture of experts routes every token to its top experts.",
    "SGLang serves large language models with a fast runtime.",
    "Tiny random models are enough for a smoke test on a CPU.",
    "Hello world, this is a tokenizer trained on a few sentences.",
]


def log(msg):
    print(f"smoke: {msg}", flush=True)


# --------------------------------------------------------------------------- build
def build(model_dir):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    vocab_size = 512
    specials = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=1024,
    )
    eos_id = hf_tok.convert_tokens_to_ids("<|endoftext|>")
    pad_id = hf_tok.convert_tokens_to_ids("<|pad|>")

    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        # Larger than the default 0.02 so that greedy logits are well separated and the
        # SGLang-vs-HF comparison is not decided by float rounding.
        initializer_range=0.2,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(1234)
    model = Qwen3MoeForCausalLM(cfg).to(torch.float32).eval()
    os.makedirs(model_dir, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    hf_tok.save_pretrained(model_dir)
    n = sum(p.numel() for p in model.parameters())
    log(f"built {model_dir}: {n} parameters, vocab {vocab_size}, eos {eos_id}")


def ensure_model(model_dir):
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        build(model_dir)


def hf_reference(model_dir):
    """Greedy ids from transformers' generate, the reference SGLang should match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(
                ids,
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        out.append(g[0, ids.shape[1]:].tolist())
    return out


# --------------------------------------------------------------------------- engine
def engine(model_dir, tp, max_total_tokens):
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    if tp > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
        ncpu = os.cpu_count() or 1
        if ncpu >= tp:
            per = ncpu // tp
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(
                f"{i * per}-{i * per + per - 1}" if per > 1 else str(i) for i in range(tp)
            )
    log(
        f"engine tp={tp} SGLANG_USE_CPU_ENGINE={os.environ['SGLANG_USE_CPU_ENGINE']} "
        f"SGLANG_CPU_OMP_THREADS_BIND={os.environ.get('SGLANG_CPU_OMP_THREADS_BIND', '(unset)')}"
    )
    ref = hf_reference(model_dir)
    log(f"hf reference ids: {ref}")

    import sglang

    t0 = time.monotonic()
    llm = sglang.Engine(
        model_path=model_dir,
        device="cpu",
        attention_backend="torch_native",
        disable_cuda_graph=True,
        dtype="float32",
        tp_size=tp,
        max_total_tokens=max_total_tokens,
        max_running_requests=4,
        mem_fraction_static=0.05,
        log_level="error",
        random_seed=0,
    )
    t_start = time.monotonic() - t0
    log(f"engine tp={tp} started in {t_start:.1f} s")
    try:
        t1 = time.monotonic()
        outs = llm.generate(
            PROMPTS,
            {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True},
        )
        t_gen = time.monotonic() - t1
        ids = [o["output_ids"] for o in outs]
        for p, o in zip(PROMPTS, outs):
            log(f"prompt {p!r}: output_ids={o['output_ids']} text={o['text']!r}")
        log(f"generate took {t_gen:.2f} s")
    finally:
        t2 = time.monotonic()
        llm.shutdown()
        log(f"engine shut down in {time.monotonic() - t2:.1f} s")
    ok = ids == ref
    log(f"engine tp={tp}: {'MATCH' if ok else 'MISMATCH'} with HF generate")
    print(json.dumps({"tp": tp, "startup_s": round(t_start, 1), "ids": ids, "hf_ids": ref,
                      "match": ok}), flush=True)
    return ok


# --------------------------------------------------------------------------- server
def _curl(args, timeout):
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", str(timeout)] + args,
        capture_output=True, text=True, timeout=timeout + 5,
    )


def _stop(proc, log_path):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log("server did not stop on SIGTERM within 30 s; SIGKILL")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    log(f"server stopped (rc={proc.returncode}); log in {log_path}")


def server(model_dir, port, startup_timeout):
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    log_path = os.path.join(os.path.dirname(os.path.abspath(model_dir)), f"server-{port}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", model_dir, "--device", "cpu",
        "--attention-backend", "torch_native", "--disable-cuda-graph",
        "--dtype", "float32", "--max-total-tokens", "2048", "--mem-fraction-static", "0.05",
        "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning",
    ]
    log("server: " + " ".join(cmd))
    ok = False
    t0 = time.monotonic()
    with open(log_path, "w") as lf:
        # own process group so that the scheduler/detokenizer children are stopped too
        proc = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        ready = False
        while time.monotonic() - t0 < startup_timeout:
            if proc.poll() is not None:
                log(f"server exited early with rc={proc.returncode}")
                break
            r = _curl(["-o", "/dev/null", "-w", "%{http_code}", f"{base}/health"], 5)
            if r.stdout.strip() == "200":
                ready = True
                break
            time.sleep(2)
        if ready:
            log(f"server healthy after {time.monotonic() - t0:.1f} s")
            body = json.dumps({"model": model_dir, "prompt": PROMPTS[0],
                               "max_tokens": MAX_NEW_TOKENS, "temperature": 0})
            r = _curl(["-H", "Content-Type: application/json", "-d", body,
                       f"{base}/v1/completions"], 60)
            log(f"/v1/completions -> {r.stdout.strip()[:600]} {r.stderr.strip()[:300]}")
            try:
                resp = json.loads(r.stdout)
                ok = bool(resp.get("choices")) and "text" in resp["choices"][0]
            except ValueError:
                ok = False
        else:
            log(f"server not healthy within {startup_timeout} s")
    finally:
        _stop(proc, log_path)
    if not ok:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        log("server log tail:\n" + tail)
    log(f"server: {'PASS' if ok else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------- main
def _run_child(args_list, timeout):
    """Run one step in a fresh interpreter (an Engine per process), bounded by timeout."""
    cmd = [sys.executable, os.path.abspath(__file__)] + args_list
    log("running: " + " ".join(args_list))
    p = subprocess.Popen(cmd, start_new_session=True)
    try:
        return p.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        log(f"step {args_list} timed out after {timeout} s; killing")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("step", choices=["build", "engine", "server", "all"])
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--port", type=int, default=30011)
    ap.add_argument("--max-total-tokens", type=int, default=2048)
    ap.add_argument("--timeout", type=int, default=300, help="per step, seconds")
    a = ap.parse_args()
    model_dir = os.path.abspath(a.model_dir)

    if a.step == "build":
        build(model_dir)
        return 0
    if a.step == "engine":
        ensure_model(model_dir)
        return 0 if engine(model_dir, a.tp, a.max_total_tokens) else 1
    if a.step == "server":
        ensure_model(model_dir)
        return 0 if server(model_dir, a.port, a.timeout) else 1

    ensure_model(model_dir)
    results = {}
    common = ["--model-dir", model_dir]
    results["engine tp=1"] = _run_child(["engine", "--tp", "1"] + common, a.timeout)
    results["engine tp=2"] = _run_child(["engine", "--tp", "2"] + common, a.timeout)
    results["server"] = _run_child(["server", "--port", str(a.port),
                                    "--timeout", str(a.timeout)] + common, a.timeout + 90)
    for k, v in results.items():
        log(f"{k}: {'PASS' if v else 'FAIL'}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
