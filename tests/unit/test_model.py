"""The plain-torch Qwen3-MoE against transformers, under continuous batching and split experts."""

import json
import time

import pytest
import torch

from resilient_ep.runtime.model import AttentionBatch, ExpertBank, MoEConfig, MoEModel
from resilient_ep.runtime.model_builder import EOS_TOKEN, make_model

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "the cat is in the house",
    "one two three four",
    "I want to go home now , please",
    "expert layer token 7 8 9 and the queue of requests",
    "red",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is as fast and does not suffer when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-moe") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return MoEModel.load(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


def hf_greedy(hf_model, ids, n):
    out = hf_model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


# ---- builder and tokenizer ---------------------------------------------------------------------
def test_make_model_is_idempotent(model_dir):
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert make_model(model_dir) == model_dir
    assert time.perf_counter() - t < 0.5
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["num_experts"] == 8 and raw["num_experts_per_tok"] == 2 and raw["norm_topk_prob"]
    assert raw["tie_word_embeddings"] is False and raw["max_position_embeddings"] >= 8192


def test_tokenizer_has_eos_and_round_trips(tokenizer, model):
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.eos_token_id == model.config.eos_token_id
    ids = tokenizer("the cat is 42 , red").input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "the cat is 4 2 , red"
    assert len(tokenizer) == model.config.vocab_size


def test_sixteen_experts_option(tmp_path):
    d = make_model(tmp_path / "m16", num_experts=16, num_layers=1, seed=3)
    m = MoEModel.load(d)
    assert m.config.num_experts == 16 and m.experts.num_slots(0) == 16
    assert len(m.generate_greedy([5, 6, 7], 4)) == 4


# ---- equality with transformers ----------------------------------------------------------------
def test_greedy_matches_transformers(model, hf_model, prompt_ids):
    for ids in prompt_ids:
        assert model.generate_greedy(ids, 32) == hf_greedy(hf_model, ids, 32)


def test_long_prompt_chunked_prefill_matches_transformers(model, hf_model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (1500,), generator=g).tolist()
    ref = hf_greedy(hf_model, ids, 4)
    assert model.generate_greedy(ids, 4, block_size=16, prefill_chunk=512) == ref


def test_eos_stops_generation(model, prompt_ids):
    ids = prompt_ids[0]
    full = model.generate_greedy(ids, 8)
    stop = full[3]
    assert model.generate_greedy(ids, 8, eos_token_id=stop) == full[: full.index(stop) + 1]


# ---- continuous batching -----------------------------------------------------------------------
def run_continuous_batch(model, prompts, arrivals, new_tokens, *, chunk, block_size, num_blocks, logits_out=None):
    """A tiny scheduler: requests arrive at given steps; prefill in chunks, decode one by one.

    Every step mixes whatever is running: prefill chunks of new requests and decode tokens of
    older ones, in a rotating order, over one shared paged cache. ``logits_out`` (a dict) gets
    each request's logits rows, one per generated token.
    """
    kv = model.make_kv_cache(num_blocks, block_size)
    state = {}  # rid -> dict(pending=[...], cached=int, out=[...])
    step = 0
    while len(state) < len(prompts) or any(len(s["out"]) < new_tokens for s in state.values()):
        for rid, at in enumerate(arrivals):
            if at == step:
                state[rid] = {"pending": list(prompts[rid]), "cached": 0, "out": []}
        live = [r for r, s in state.items() if len(s["out"]) < new_tokens]
        live = live[step % len(live) :] + live[: step % len(live)] if live else live
        tables, cached, new, tokens = [], [], [], []
        for r in live:
            s = state[r]
            take = s["pending"][:chunk]
            table = kv.reserve(r, s["cached"] + len(take))
            tables.append(table)
            cached.append(s["cached"])
            new.append(len(take))
            tokens += take
        step += 1
        if not live:
            continue
        batch = AttentionBatch(tables, cached, new, block_size)
        logits = model.forward_step(torch.tensor(tokens), batch, kv)
        for i, r in enumerate(live):
            s = state[r]
            s["cached"] += new[i]
            s["pending"] = s["pending"][new[i] :]
            if not s["pending"]:
                if logits_out is not None:
                    logits_out.setdefault(r, []).append(logits[i].clone())
                tok = int(logits[i].argmax())
                s["out"].append(tok)
                s["pending"] = [tok]
                if len(s["out"]) == new_tokens:
                    kv.free(r)
    return [state[r]["out"] for r in range(len(prompts))]


def test_continuous_batch_equals_each_request_alone(model, prompt_ids):
    g = torch.Generator().manual_seed(2)
    long_prompt = torch.randint(10, model.config.vocab_size, (37,), generator=g).tolist()
    prompts = [*prompt_ids, long_prompt]
    arrivals = [0, 0, 1, 3, 4, 6]
    n = 12
    got = run_continuous_batch(model, prompts, arrivals, n, chunk=5, block_size=4, num_blocks=64)
    for ids, out in zip(prompts, got):
        assert out == model.generate_greedy(ids, n)


def test_attention_batch_derived_fields():
    b = AttentionBatch([[0, 1], [2]], [5, 0], [1, 3], 4)
    assert b.positions.tolist() == [5, 0, 1, 2]
    assert b.slots.tolist() == [5, 8, 9, 10]
    assert b.query_start == [0, 1, 4]
    assert b.last_token_index.tolist() == [0, 3]
    with pytest.raises(ValueError, match="need 2 blocks of 4, block table has 1"):
        AttentionBatch([[0]], [4], [1], 4)
    with pytest.raises(ValueError, match=r"num_new \(0\) must be > 0"):
        AttentionBatch([[0]], [0], [0], 4)


# ---- split experts -----------------------------------------------------------------------------
def test_expert_bank_subsets_with_manual_dispatch_equal_moe_local(model, model_dir, prompt_ids):
    cfg = model.config
    # Two "ranks": rank 0 holds even experts + an empty spare slot, rank 1 odd experts + a replica of 0.
    placement = {
        0: [0, 2, 4, 6, -1],
        1: [1, 3, 5, 7, 0],
    }
    banks = {
        r: ExpertBank.load(model_dir, {l: slots for l in range(cfg.num_layers)}) for r, slots in placement.items()
    }
    where = {}  # logical expert -> (rank, slot); expert 0 served by its replica on rank 1
    for r, slots in placement.items():
        for s, e in enumerate(slots):
            if e >= 0:
                where[e] = (r, s)
    ids = torch.tensor(prompt_ids[3] + prompt_ids[2])
    kv = model.make_kv_cache(16, 4)
    batch = AttentionBatch([kv.reserve(0, len(ids))], [0], [len(ids)], 4)
    with torch.inference_mode():
        h = model.embed(ids)
        for layer in range(cfg.num_layers):
            h = model.attention(layer, h, batch, kv)
            x, topk_ids, topk_w = model.route(layer, h)
            assert topk_ids.dtype == torch.int64 and topk_w.dtype == torch.float32
            assert torch.allclose(topk_w.sum(-1), torch.ones(len(ids)))
            ref = model.moe_local(layer, x, topk_ids, topk_w)
            # Manual dispatch: flatten (token, k) pairs, send each to the rank holding its expert.
            tok = torch.arange(len(ids)).repeat_interleave(cfg.top_k)  # [T*k]
            flat_e = topk_ids.reshape(-1)
            rank = torch.tensor([where[int(e)][0] for e in flat_e])
            slot = torch.tensor([where[int(e)][1] for e in flat_e])
            y = torch.zeros(len(tok), cfg.hidden_size)
            for r, bank in banks.items():
                sel = (rank == r).nonzero().squeeze(1)
                y[sel] = bank.forward(layer, slot[sel], x[tok[sel]])
            combined = torch.zeros_like(x).index_add_(0, tok, y * topk_w.reshape(-1, 1))
            torch.testing.assert_close(combined, ref, rtol=1e-5, atol=1e-5)
            h = model.moe_add(h, ref)


def test_expert_bank_loads_only_requested_experts(model, model_dir):
    bank = ExpertBank.load(model_dir, {1: [5, -1, 2]})
    assert bank.layers == [1]
    i, hdim = model.config.moe_intermediate_size, model.config.hidden_size
    assert bank.gate_up[1].shape == (3, 2 * i, hdim) and bank.down[1].shape == (3, hdim, i)
    full = model.experts
    assert torch.equal(bank.get_slot(1, 0).gate_up, full.get_slot(1, 5).gate_up)
    assert torch.equal(bank.get_slot(1, 2).down, full.get_slot(1, 2).down)
    assert not bank.gate_up[1][1].any()
    with pytest.raises(ValueError, match="empty slot 1"):
        bank.forward(1, torch.tensor([0, 1]), torch.randn(2, hdim))
    with pytest.raises(ValueError, match=r"expert \(9\) must be in \[0, 8\)"):
        ExpertBank.load(model_dir, {0: [9]})


def test_expert_bank_set_slot_copies_in_place(model, model_dir):
    bank = ExpertBank.load(model_dir, {0: [1, -1]})
    ptrs = (bank.gate_up[0].data_ptr(), bank.down[0].data_ptr())
    w3 = ExpertBank.read_expert(model_dir, 0, 3)
    bank.set_slot(0, 1, w3, expert=3)
    assert (bank.gate_up[0].data_ptr(), bank.down[0].data_ptr()) == ptrs
    assert bank.slot_experts[0] == [1, 3]
    x = torch.randn(4, model.config.hidden_size)
    ids = torch.tensor([[1, 3]] * 4)
    w = torch.full((4, 2), 0.5)
    torch.testing.assert_close(bank.moe(0, x, ids, w), model.moe_local(0, x, ids, w))
    # Replicate slot 0 into slot 1 from the bank itself, then empty it.
    bank.set_slot(0, 1, bank.get_slot(0, 0), expert=1)
    assert torch.equal(bank.gate_up[0][1], bank.gate_up[0][0])
    bank.set_slot(0, 1, None)
    assert bank.slot_experts[0] == [1, -1] and not bank.down[0][1].any()


def test_model_without_experts_refuses_moe_local(model_dir):
    m = MoEModel.load(model_dir, experts=False)
    assert m.experts is None
    with pytest.raises(RuntimeError, match="needs experts"):
        m.moe_local(0, torch.zeros(1, m.config.hidden_size), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))


# ---- the random model is not degenerate --------------------------------------------------------
def test_outputs_are_not_degenerate(model, prompt_ids):
    outs = [tuple(model.generate_greedy(ids, 16)) for ids in prompt_ids]
    assert len(set(outs)) == len(outs)  # different prompts, different continuations
    assert all(len(set(o)) > 4 for o in outs)  # not one token repeated
    ids = torch.tensor([t for p in prompt_ids for t in p])
    kv = model.make_kv_cache(32, 4)
    batch = AttentionBatch([kv.reserve(0, len(ids))], [0], [len(ids)], 4)
    with torch.inference_mode():
        h = model.embed(ids)
        for layer in range(model.config.num_layers):
            h = model.attention(layer, h, batch, kv)
            x, topk_ids, w = model.route(layer, h)
            assert len(torch.unique(topk_ids)) > model.config.num_experts // 2
            h = model.moe_add(h, model.moe_local(layer, x, topk_ids, w))


def test_config_errors_name_the_field(model_dir):
    raw = json.loads((model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"use_sliding_window \(True\)"):
        MoEConfig.from_dict({**raw, "use_sliding_window": True})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        MoEConfig.from_dict({**raw, "mlp_only_layers": [0]})


# ---- batch invariance (per_row attention + a batch-invariant linear) ---------------------------
def block_linear(x, weight, block=16):
    """Fixed 16-row blocks, zero-padded: each row always meets the same GEMM shape."""
    pad = (-x.shape[0]) % block
    xp = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x
    return torch.cat([torch.nn.functional.linear(c, weight) for c in xp.split(block)])[: x.shape[0]]


@pytest.fixture(scope="module")
def invariant_model(model_dir):
    return MoEModel.load(model_dir, linear=block_linear, attention_mode="per_row")


def test_per_row_mode_still_matches_transformers(invariant_model, hf_model, prompt_ids):
    ids = prompt_ids[3]
    assert invariant_model.generate_greedy(ids, 32) == hf_greedy(hf_model, ids, 32)


def test_per_row_logits_are_bitwise_independent_of_batch_and_chunking(invariant_model, prompt_ids):
    prompts = prompt_ids[:4]
    n = 6
    batched = {}
    run_continuous_batch(
        invariant_model, prompts, [0, 0, 1, 2], n, chunk=3, block_size=4, num_blocks=64, logits_out=batched
    )
    for r, ids in enumerate(prompts):
        alone = {}
        run_continuous_batch(
            invariant_model, [ids], [0], n, chunk=len(ids), block_size=16, num_blocks=8, logits_out=alone
        )
        assert torch.equal(torch.stack(batched[r]), torch.stack(alone[0]))


def test_per_row_recompute_after_kv_restore_is_bitwise_equal(invariant_model, prompt_ids):
    """Decode, checkpoint whole blocks, restore them elsewhere, recompute the tail as one chunk."""
    m, bs = invariant_model, 4
    prompt = prompt_ids[3]
    kv = m.make_kv_cache(32, bs)
    seq = list(prompt)
    table = kv.reserve("r", len(seq))
    logits = m.forward_step(torch.tensor(seq), AttentionBatch([table], [0], [len(seq)], bs), kv)
    history = []  # (tokens before the step, logits)
    for _ in range(10):
        tok = int(logits[0].argmax())
        seq.append(tok)
        table = kv.reserve("r", len(seq))
        logits = m.forward_step(torch.tensor([tok]), AttentionBatch([table], [len(seq) - 1], [1], bs), kv)
        history.append(logits[0].clone())
    ckpt_tokens = (len(prompt) // bs + 1) * bs  # whole blocks checkpointed, a few decodes in
    blocks = kv.read_blocks(table[: ckpt_tokens // bs])
    fresh = m.make_kv_cache(32, bs)
    fresh.reserve("pad", 5)
    new_table = fresh.reserve("r", len(seq))
    fresh.write_blocks(new_table[: ckpt_tokens // bs], blocks)
    tail = seq[ckpt_tokens:]
    out = m.forward_step(torch.tensor(tail), AttentionBatch([new_table], [ckpt_tokens], [len(tail)], bs), fresh)
    assert torch.equal(out[0], history[-1])


def test_choice_order_combine_equals_expert_order_for_top2(model, model_dir):
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        x_normed, ids, w = model.route(0, x)
        a = model.moe_local(0, x_normed, ids, w, order="expert")
        b = model.moe_local(0, x_normed, ids, w, order="choice")
    assert torch.equal(a, b)  # k = 2: same bits in either order
    bank = ExpertBank.load(model_dir, {0: [0, 1]})
    with pytest.raises(ValueError, match=r"experts \[2, 3\] are not in this bank"):
        bank.moe(0, x[:2], torch.tensor([[0, 2], [3, 1]]), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="order"):
        model.moe_local(0, x_normed, ids, w, order="random")
