"""Builds a tiny random-weight Qwen3-MoE checkpoint with a local word-level tokenizer.

The checkpoint is a standard Hugging Face directory that ``transformers``, vLLM, SGLang and
``resilient_ep.runtime.model`` all load:

- ``config.json`` / ``generation_config.json``  (``Qwen3MoeConfig``, ``architectures=[Qwen3MoeForCausalLM]``)
- ``model.safetensors``  fp32, one tensor per expert projection
  (``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``), as Hub checkpoints store them
- ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json``  a ``tokenizers``
  WordLevel model over a fixed list of English words, digits (split one by one) and punctuation,
  with ``<|endoftext|>`` as eos and pad, ``<unk>`` for anything else
- ``resilient_ep_model.json``  the build parameters; written last, it makes ``make_model`` idempotent

Weights are re-initialised after construction with a seeded generator at scales that keep a
random model *interesting*: activations of order one, a router whose top-k spreads over the
experts, and greedy continuations that differ between prompts (HF's default
``initializer_range=0.02`` gives a model that repeats one token forever).

Usage: ``make_model("/tmp/tiny-moe")`` → ``Path("/tmp/tiny-moe")`` (about 1 s; 0 s when present).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ModelSpec", "make_model", "VOCAB_WORDS", "SPECIAL_TOKENS", "EOS_TOKEN"]

MARKER = "resilient_ep_model.json"
BUILDER_VERSION = 2

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [EOS_TOKEN, UNK_TOKEN, "<|im_start|>", "<|im_end|>"]
PUNCTUATION = list(".,;:!?'\"()[]{}-_/+*=<>@#$%&|~^`\\")
DIGITS = list("0123456789")

# Common English words, one entry each (lower case plus a few capitalised sentence starters).
VOCAB_WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they
we say her she or an will my one all would there their what so up out if about who get which go
me when make can like time no just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first well
way even new want because any these give day most us is are was were been has had did does said
made went came took saw knew got gave found told asked seemed felt left put meant kept let began
man woman child world life hand part place case week company system program question government
number night point home water room mother area money story fact month lot right study book eye job
word business issue side kind head house service friend father power hour game line end member law
car city community name president team minute idea kid body information school face others level
office door health person art war history party result change morning reason research girl guy
moment air teacher force education foot boy age policy everything process music market sense nation
plan college interest death experience effect class control care field development role effort rate
heart drug show leader light voice wife police mind price report decision son view relationship town
road arm difference value building action model season society tax director position player record
paper space ground form event official matter center couple site project activity star table need
court oil situation cost industry figure street image phone data picture practice piece land product
doctor wall patient worker news test movie north love support technology step baby computer type
attention film tree source organization hair window evidence population truth song energy fire
river sea sky sun moon rain snow wind stone bird fish dog cat horse cow bread milk tea coffee apple
red blue green black white yellow small large big little long short high low old young great best
better bad worse hard easy early late full empty hot cold warm cool dark bright quiet loud fast slow
strong weak rich poor happy sad real true false free open close simple clear sure ready able whole
every each many much more less few several same different next last own other such important
possible public private local national human social political economic military special general
again never always often still already soon here where why very really almost together away around
under between through during before against without within along across behind above below near
off down yet once since while until though although however perhaps maybe quite rather enough
run walk talk read write speak listen hear watch play move live believe hold bring happen stand
lose pay meet include continue set learn lead understand follow stop create add spend grow offer
remember consider appear buy wait serve die send expect build stay fall cut reach kill remain
suggest raise pass sell require decide return explain hope develop carry break receive agree
win open close start finish help show try call keep turn begin seem leave feel become mean tell
ask need find think sing dance draw drive fly swim sleep eat drink cook clean wash open paint
teach count measure fix check choose cover fill join share save store send sort split merge route
expert layer token model rank node cache block queue batch request reply signal packet message
one two three four five six seven eight nine ten hundred thousand million zero first second third
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July
August September October November December The A In It He She They We You I This That
""".split()


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines a built checkpoint (stored in ``resilient_ep_model.json``)."""

    seed: int = 0
    num_layers: int = 2
    hidden_size: int = 128
    num_experts: int = 8
    top_k: int = 2
    vocab_size: int = 768
    moe_intermediate_size: int = 64
    intermediate_size: int = 256
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 16384
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = True
    init_gain: float = 1.0
    builder_version: int = BUILDER_VERSION

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_experts", "top_k", "moe_intermediate_size",
                     "num_attention_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even (RoPE)")
        least = len(SPECIAL_TOKENS) + len(PUNCTUATION) + len(DIGITS) + 64
        if self.vocab_size < least:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be >= {least}")


def base_vocab() -> list[str]:
    """Special tokens, punctuation, digits and words, deduplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for tok in [*SPECIAL_TOKENS, *PUNCTUATION, *DIGITS, *VOCAB_WORDS]:
        seen.setdefault(tok, None)
    return list(seen)


def vocab_tokens(vocab_size: int) -> list[str]:
    """``vocab_size`` tokens: the base vocabulary (cut short if too long), then ``<extra_i>``."""
    toks = base_vocab()[:vocab_size]
    toks += [f"<extra_{i}>" for i in range(vocab_size - len(toks))]
    return toks


def make_model(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_experts: int = 8,
    top_k: int = 2,
    vocab_size: int = 768,
    moe_intermediate_size: int = 64,
    num_attention_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    max_position_embeddings: int = 16384,
    norm_topk_prob: bool = True,
    init_gain: float = 1.0,
) -> Path:
    """Build (or find) a tiny random Qwen3-MoE checkpoint in ``out_dir``; returns its path.

    If ``out_dir`` already holds a model built with the same parameters this returns at once.
    Otherwise the files are written to a temporary sibling directory and moved in, the marker
    file last, so a reader never sees a half-written checkpoint under the marker.
    """
    spec = ModelSpec(
        seed=seed, num_layers=num_layers, hidden_size=hidden_size, num_experts=num_experts,
        top_k=top_k, vocab_size=vocab_size, moe_intermediate_size=moe_intermediate_size,
        num_attention_heads=num_attention_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, norm_topk_prob=norm_topk_prob,
        init_gain=init_gain,
    )
    out = Path(out_dir)
    marker = out / MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == asdict(spec):
                return out
        except (OSError, ValueError):
            pass
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        _build(spec, tmp)
        marker.unlink(missing_ok=True)
        for f in sorted(tmp.iterdir()):
            f.chmod(0o644)
            os.replace(f, out / f.name)
        (out / MARKER).write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build(spec: ModelSpec, out: Path) -> None:
    _save_tokenizer(spec, out)
    _save_model(spec, out)


def _save_tokenizer(spec: ModelSpec, out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocab_tokens(spec.vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out)
    # transformers 5 writes tokenizer_class "TokenizersBackend", unknown to transformers 4;
    # "PreTrainedTokenizerFast" loads in both. Older readers also look for special_tokens_map.json.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    special = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def _config(spec: ModelSpec):
    from transformers import Qwen3MoeConfig

    eos = vocab_tokens(spec.vocab_size).index(EOS_TOKEN)
    return Qwen3MoeConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        moe_intermediate_size=spec.moe_intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        norm_topk_prob=spec.norm_topk_prob,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=None,
        dtype="float32",
    )


def _save_model(spec: ModelSpec, out: Path) -> None:
    import torch
    from transformers import Qwen3MoeForCausalLM

    cfg = _config(spec)
    torch.manual_seed(spec.seed)
    model = Qwen3MoeForCausalLM(cfg).to(torch.float32)
    _reinit(model, spec)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    # Older readers (transformers < 5, engines that read config.json themselves) look for
    # ``num_experts`` and ``rope_theta`` at the top level; add them beside the v5 names.
    cfg_path = out / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw.setdefault("num_experts", spec.num_experts)
    raw.setdefault("rope_theta", spec.rope_theta)
    raw.setdefault("torch_dtype", "float32")
    cfg_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _reinit(model, spec: ModelSpec) -> None:
    """Seeded init at scales that keep activations O(1) and outputs varied (see module doc).

    - embeddings: N(0, 1); RMSNorm weights: 1 + N(0, 0.1) (so a norm applied to the wrong
      tensor shows up); linear weights: N(0, gain / fan_in); router: N(0, 4 / hidden) so that
      router logits have unit-ish spread; lm_head: N(0, 4 / hidden) for peaked logits.
    """
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    gain = spec.init_gain
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("embed_tokens.weight"):
                val = torch.randn(p.shape, generator=g)
            elif name.endswith("mlp.gate.weight") or name == "lm_head.weight":
                val = torch.randn(p.shape, generator=g) * (2.0 / math.sqrt(p.shape[-1]))
            else:
                # Linear [out, in] or fused experts [E, out, in]: fan_in is the last dim.
                val = torch.randn(p.shape, generator=g) * (gain / math.sqrt(p.shape[-1]))
            p.copy_(val)
