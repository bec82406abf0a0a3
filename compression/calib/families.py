"""What the calibration engine and the methods need to know about a model family, as data.

ONE table keyed by ``config.model_type``. Adding a family is adding an entry here (and a tiny
config to the method x model test matrix); no method has per-family code. Module paths are
relative to the model's ``base_model`` (``model.model`` of a ``*ForCausalLM``, the
``BertModel`` itself) except ``head`` (relative to the top model) and everything inside a
block (relative to the block).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..base import UnsupportedModelError


@dataclass(frozen=True)
class Group:
    """Linears of a block that read one tensor, and the op that produces it (where an input
    scale ``s`` folds: the producer's output is divided by ``s`` while the group's weight columns
    are multiplied by it). ``fold_into`` None: the producer cannot take a scale."""

    linears: tuple[str, ...]
    fold_into: str | None = None
    #: the producer is a fused Linear and only part ``i`` of ``n`` equal row blocks produces
    #: this input (phi3's ``gate_up_proj``: up is the second half)
    fold_part: tuple[int, int] | None = None


@dataclass(frozen=True)
class Attention:
    """Separate q/k/v/o Linears of a block's attention (structured head pruning)."""

    q: str
    k: str
    v: str
    o: str


@dataclass(frozen=True)
class Mlp:
    """The FFN of a block: Linears whose output rows are the intermediate neurons and the one
    whose input columns are (structured neuron pruning)."""

    neurons_out: tuple[str, ...]
    neurons_in: str
    #: attribute of the MLP module holding its width, updated when neurons are removed
    size_attr: str | None = None
    module: str | None = None


@dataclass(frozen=True)
class Family:
    model_type: str
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    head: str | None
    #: shared-input groups of one block in execution order
    groups: tuple[Group, ...]
    attention: Attention | None
    mlp: Mlp | None
    #: the family's norms compute ``x * (offset + weight)``: gemma's RMSNorm uses ``1 + weight``,
    #: so folding ``1/s`` into it sets ``weight = (offset + weight) / s - offset``
    norm_offset: float = 0.0
    #: a decoder (causal LM): generates text, takes ``use_cache``
    causal: bool = True
    #: some Linears fuse what other families keep apart (phi3: qkv_proj, gate_up_proj)
    fused: bool = False


def _llama_like(model_type: str, norm_offset: float = 0.0, ffn_norm: str = "post_attention_layernorm"
                ) -> Family:
    return Family(
        model_type=model_type,
        blocks="layers",
        embeddings=("embed_tokens", "rotary_emb"),
        final_norm="norm",
        head="lm_head",
        groups=(
            Group(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
            Group(("self_attn.o_proj",), "self_attn.v_proj"),
            Group(("mlp.gate_proj", "mlp.up_proj"), ffn_norm),
            Group(("mlp.down_proj",), "mlp.up_proj"),
        ),
        attention=Attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                            "self_attn.o_proj"),
        mlp=Mlp(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size", "mlp"),
        norm_offset=norm_offset,
    )


FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    # q_norm / k_norm act on q/k's outputs per head: the input scales of q/k/v are unaffected
    "qwen3": _llama_like("qwen3"),
    # gemma: (1 + weight) RMSNorms; the MLP reads pre_feedforward_layernorm's output
    # (post_attention_layernorm normalises the attention output before the residual add)
    "gemma2": _llama_like("gemma2", 1.0, "pre_feedforward_layernorm"),
    "gemma3_text": _llama_like("gemma3_text", 1.0, "pre_feedforward_layernorm"),
    # mixture of experts: the experts are Linears once ..moe.linearize_experts ran (named as in
    # the checkpoint layout, mlp.experts.<e>.gate_proj / .w1 ...), each a group of its own; the
    # router (mlp.gate) is not a Linear and is never quantized or pruned. No structured FFN
    # pruning (mlp None): an expert's neurons are not the block's FFN width
    "qwen3_moe": replace(_llama_like("qwen3_moe"), mlp=None),
    "mixtral": replace(_llama_like("mixtral"), mlp=None),
    "phi3": Family(
        model_type="phi3",
        blocks="layers",
        embeddings=("embed_tokens", "rotary_emb"),
        final_norm="norm",
        head="lm_head",
        groups=(
            Group(("self_attn.qkv_proj",), "input_layernorm"),
            # v is a row block of qkv_proj of another size than q: no fold
            Group(("self_attn.o_proj",), None),
            Group(("mlp.gate_up_proj",), "post_attention_layernorm"),
            Group(("mlp.down_proj",), "mlp.gate_up_proj", fold_part=(1, 2)),
        ),
        attention=None,
        mlp=None,
        fused=True,
    ),
    "bert": Family(
        model_type="bert",
        blocks="encoder.layer",
        embeddings=("embeddings",),
        final_norm=None,
        head=None,
        groups=(
            Group(("attention.self.query", "attention.self.key", "attention.self.value"), None),
            Group(("attention.output.dense",), "attention.self.value"),
            # post-LN: attention.output.LayerNorm's output is also the residual stream, so a
            # scale cannot fold into it
            Group(("intermediate.dense",), None),
            Group(("output.dense",), None),  # GELU between intermediate and output: no fold
        ),
        attention=None,  # transformers 5 BERT cannot load a model with fewer heads
        mlp=Mlp(("intermediate.dense",), "output.dense"),
        causal=False,
    ),
}

#: families whose blocks run as decoders (causal LMs)
DECODERS = frozenset(k for k, f in FAMILIES.items() if f.causal)


def family_of(model_or_config: Any) -> Family:
    """The table entry of a model (or its HF config); UnsupportedModelError naming the
    supported families otherwise."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = getattr(cfg, "model_type", None)
    fam = FAMILIES.get(mt) if isinstance(mt, str) else None
    if fam is None:
        raise UnsupportedModelError(
            f"model type {mt!r} is not supported; supported: {sorted(FAMILIES)}")
    return fam


def supporting(need: str) -> frozenset[str]:
    """Model types whose entry has ``need``: "blocks" (every family), "folds" (a norm takes the
    scale of the first group), "attention", "mlp", "causal" or "unfused"."""
    if need == "blocks":
        return frozenset(FAMILIES)
    if need == "folds":
        return frozenset(k for k, f in FAMILIES.items() if f.groups[0].fold_into)
    if need == "causal":
        return DECODERS
    if need == "unfused":
        return frozenset(k for k, f in FAMILIES.items() if not f.fused)
    return frozenset(k for k, f in FAMILIES.items() if getattr(f, need) is not None)


def shared_inputs(model_or_config: Any) -> list[tuple[str, ...]]:
    """The block-relative names of Linears that read one tensor (groups of two or more) of a
    model's family; empty for a model type the table does not know."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = getattr(cfg, "model_type", None)
    fam = FAMILIES.get(mt) if isinstance(mt, str) else None
    return [g.linears for g in fam.groups if len(g.linears) > 1] if fam else []
