"""The method x model matrix: every registered method on every tiny model family, as a one-stage
job through ``run_pipeline`` (load, measure, compress, save, reload with plain
``from_pretrained``, measure the artifact). A method that does not support a family must be
refused before any work (the check a submission runs), with the family named, and leave no
output behind."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modelpress.compression import CompressionError, methods, parse_params
from modelpress.compression.data import default_eval_text
from modelpress.compression.pipeline import run_pipeline

CAL = {"num_samples": 4, "seq_len": 32}
#: tiny-model parameters for every method; a new method must be added here (checked below)
TINY = {
    "magnitude": {"sparsity": 0.5},
    "wanda": {"sparsity": 0.5, **CAL},
    "sparsegpt": {"sparsity": 0.5, **CAL},
    "admm": {"sparsity": 0.5, **CAL},
    "lottery_ticket": {"rounds": 1, "prune_per_round": 0.3, "steps_per_round": 2, "batch_size": 2,
                       "seq_len": 32, "max_minutes": 1, "eval_chunks": 1},
    "heads": {"ratio": 0.5, **CAL},
    "ffn": {"ratio": 0.25, **CAL},
    "layers": {"count": 1, **CAL},
    "int8": {},
    "int8_dynamic": {**CAL},
    "rtn": {"bits": 4, "group_size": 16},
    "gptq": {"bits": 4, "group_size": 16, **CAL},
    "awq": {"bits": 4, "group_size": 16, **CAL},
    "distill": {"steps": 2, "batch_size": 2, "seq_len": 32, "max_minutes": 1},
    # the calibrated variant (static activation scales, FP8 KV cache): refused on bert
    "fp8": {"activations": "static", "kv_cache": True, **CAL},
    "nvfp4": {},
    "mxfp4": {},
}
#: every family of the family table (compression/calib/families.py), as a tiny random model
CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen3_moe",
          "mixtral"]
FAMILIES = [*CAUSAL, "bert"]
#: every device this machine has: CPU always; CUDA too where a GPU is present (the same matrix
#: then checks that each method keeps its tensors on the chosen device)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EVAL = default_eval_text()[:6000]


def test_every_registered_method_is_in_the_matrix():
    assert set(TINY) == set(methods())


#: the fast lane (``make test-fast``) runs every method on these; CI runs every family
CORE = ("llama", "bert")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", [f if f in CORE else pytest.param(f, marks=pytest.mark.wide)
                                    for f in FAMILIES])
@pytest.mark.parametrize("name", sorted(TINY))
def test_method_on_tiny_model(name, family, device, request, tmp_path):
    if family in ("llama", "bert"):
        src = request.getfixturevalue(f"tiny_{family}_dir")
    else:
        src = request.getfixturevalue("tiny_causal_dir")(family)
    method = methods()[name]
    out = tmp_path / "out"
    stage = [{"method": name, "params": TINY[name]}]
    try:  # what submission checks: the method's architectures and its own validation
        method.check_model(parse_params(name, TINY[name]), AutoConfig.from_pretrained(src))
        refused = None
    except CompressionError as e:
        refused = e
    if refused is not None:
        assert family in str(refused)
        with pytest.raises(type(refused), match=family):
            run_pipeline(src, stage, out, eval_text=EVAL, device=device, measure="quality")
        assert not out.exists() or not any(out.iterdir())
        return
    # quality only: the speed rounds (tested in test_measure/test_pipeline) cost more than the
    # method on a tiny model
    outcome = run_pipeline(src, stage, out, eval_text=EVAL, device=device, measure="quality")
    before, after = outcome.report["before"], outcome.report["after"]
    assert outcome.report["device"]["device"] == device
    # the artifact loads with plain from_pretrained and runs
    cfg = AutoConfig.from_pretrained(out)
    causal = family != "bert"
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(out).eval()
    y = _outputs(model, causal)
    assert torch.isfinite(y).all()
    # ...with the outputs of the method's reference: the method run in memory on the source
    if name in TOL:
        ref = _reference(src, name, causal)
        err = ((y - ref).norm() / ref.norm()).item()
        assert err < TOL[name], f"artifact vs in-memory {name}: relative error {err:.2e}"
    # ...and the method did what its family promises, measured on that artifact
    if method.family == "quantization":
        assert after["bytes"] < 0.6 * before["bytes"], "quantized artifact is not smaller"
    elif name in ("heads", "ffn", "layers"):
        assert after["params"] < before["params"]
        assert cfg.num_hidden_layers < 4 if (name == "layers" and family == "llama") else True
    elif method.family == "pruning":
        assert after["sparsity"] >= 0.25, f"sparsity {after['sparsity']}"
    else:  # distillation: the weights were trained
        assert after["bytes"] == before["bytes"]
        assert outcome.report["stages"][0]["metrics"]
    assert causal == ("perplexity" in after)


IDS = torch.tensor([[5, 9, 17, 33, 60, 7, 81, 200]])
#: artifact outputs vs the method's in-memory result, relative L2 error: float artifacts are the
#: same weights; quantized artifacts store dense tensors (embeddings, norms) in float16 and
#: int8_dynamic's in-memory model runs int8 activations where the reload fake-quantizes them.
#: The trained methods (distill, lottery_ticket) have no deterministic in-memory reference.
TOL = {"magnitude": 1e-5, "wanda": 1e-5, "sparsegpt": 1e-5, "admm": 1e-5, "heads": 1e-5,
       "ffn": 1e-5, "layers": 1e-5, "int8": 1e-2, "rtn": 1e-2, "gptq": 1e-2, "awq": 1e-2,
       "int8_dynamic": 5e-2,
       # fp8: float16 dense tensors move the activations' FP8 scales; FP4: compressed-tensors
       # decompresses FP4 weights to bfloat16, the reload runs in bfloat16
       "fp8": 5e-2, "nvfp4": 3e-2, "mxfp4": 3e-2}


def _outputs(model, causal: bool) -> torch.Tensor:
    with torch.no_grad():
        y = model(input_ids=IDS)
    return y.logits if causal else y.last_hidden_state


def _reference(src, name: str, causal: bool) -> torch.Tensor:
    from modelpress.compression import Context, compress
    from modelpress.compression.models import load_pretrained

    lm = load_pretrained(src)
    res = compress(lm.model, parse_params(name, TINY[name]), Context(tokenizer=lm.tokenizer))
    return _outputs(res.model.eval(), causal)


def test_every_family_is_in_the_matrix() -> None:
    from modelpress.compression.calib.families import FAMILIES as TABLE

    assert set(FAMILIES) == set(TABLE)
