"""compression/streaming: lazy checkpoints, the sharded writer, block-by-block quantization and
measurement, GGUF converted tensor by tensor. Tiny random llamas written as sharded bf16
safetensors with a tiny shard size; peak memory is measured by benchmarks/large_models.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from modelpress.compression import evaluation as E
from modelpress.compression.base import CompressionError, Context
from modelpress.compression.data import default_eval_text, token_chunks
from modelpress.compression.models import load_pretrained
from modelpress.compression.pipeline import run_pipeline
from modelpress.compression.registry import get_method
from modelpress.compression.streaming import LazyCheckpoint, ShardedWriter, release
from modelpress.compression.streaming.artifact_source import ArtifactCheckpoint
from modelpress.compression.streaming.compress import stream_quantize
from modelpress.compression.streaming.forward import blockwise_perplexity

from ..conftest import make_tiny_llama


def _write_bf16(d: Path, tok, **overrides) -> Path:
    make_tiny_llama(**overrides).to(torch.bfloat16).save_pretrained(d, max_shard_size="100KB")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return _write_bf16(tmp_path_factory.mktemp("bf16-tied"), tiny_tokenizer)


@pytest.fixture(scope="module")
def bf16_untied_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return _write_bf16(tmp_path_factory.mktemp("bf16-untied"), tiny_tokenizer,
                       tie_word_embeddings=False)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_source_is_sharded_bf16(bf16_dir):
    idx = json.loads((bf16_dir / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 2
    with LazyCheckpoint(bf16_dir) as ck:
        assert ck.dtype == torch.bfloat16
        assert ck.alias == {} and "lm_head.weight" not in ck


@torch.no_grad()
def test_lazy_load_gives_from_pretrained_logits(bf16_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 17, 250, 3, 99, 400, 7]])
    with LazyCheckpoint(bf16_dir) as ck:
        model = ck.skeleton()
        assert all(p.is_meta for p in model.parameters())
        assert not model.model.rotary_emb.inv_freq.is_meta  # computed, not read
        assert ck.alias == {"lm_head.weight": "model.embed_tokens.weight"}
        ck.materialize(model, "")
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        release(model.model.layers[1])
        assert all(p.is_meta for p in model.model.layers[1].parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_blockwise_perplexity_equals_whole_model(bf16_dir, bf16_untied_dir, tiny_tokenizer, tied):
    d = bf16_dir if tied else bf16_untied_dir
    windows = token_chunks(tiny_tokenizer, default_eval_text(), 6, 64)
    with LazyCheckpoint(d) as ck:
        model = ck.skeleton()
        materialized: list[str] = []
        real = ck.materialize

        def spy(m, prefix, *a, **kw):
            materialized.append(prefix)
            return real(m, prefix, *a, **kw)

        ck.materialize = spy
        st = blockwise_perplexity(ck, model, windows, batch_size=4)
        assert all(p.is_meta for p in model.parameters())
    # never whole: the embeddings' used rows only, the head's rows a piece at a time
    assert "model.embed_tokens" not in materialized and "lm_head" not in materialized
    assert sum(p.startswith("model.layers.") for p in materialized) == 4
    whole = load_pretrained(d).model  # float32, as jobs load it
    ref = E.perplexity(whole, tiny_tokenizer, default_eval_text(), seq_len=64, num_chunks=6)
    assert math.isclose(st.perplexity, ref, rel_tol=1e-6)
    assert st.nonzero_params == E.nonzero_count(whole)


def test_writer_shards_and_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(i + 1, 10, generator=g).to(dt)
               for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16] * 4)}
    tensors["ints"] = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    tensors["big"] = torch.randn(40, 10, generator=g)  # 1600 bytes: a shard of its own
    w = ShardedWriter(tmp_path, max_shard_bytes=1000)
    for k, t in tensors.items():
        if k == "t3":  # in pieces: its rows one at a time
            w.add_pieces(k, t.dtype, list(t.shape), list(t))
        else:
            w.add(k, t)
    files = w.close()
    k = len(files)
    assert k > 3 and [f.name for f in files] == [
        f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(tensors)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                               for t in tensors.values())
    for f in files:
        with safe_open(str(f), "pt") as sf:
            names = list(sf.keys())
            assert sf.metadata() == {"format": "pt"}
            size = sum(sf.get_tensor(n).numel() * sf.get_tensor(n).element_size() for n in names)
            assert size <= 1000 or len(names) == 1
            for n in names:
                assert idx["weight_map"][n] == f.name
                assert _raw(sf.get_tensor(n)) == _raw(tensors[n])
    assert not list(tmp_path.glob("*.partial"))


def test_writer_one_shard_and_large_header(tmp_path):
    """One shard is named model.safetensors (no index); a header past the reserved area (4,000
    tensors) moves the data once and stays readable."""
    w = ShardedWriter(tmp_path)
    tensors = {f"layer.{i}.a_rather_long_parameter_name.weight": torch.full((2,), float(i))
               for i in range(4000)}
    for k, t in tensors.items():
        w.add(k, t)
    assert [f.name for f in w.close()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    back = _tensors(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in back)
    with pytest.raises(RuntimeError):
        w.add("late", torch.zeros(1))


def test_writer_rejects_bad_input(tmp_path):
    w = ShardedWriter(tmp_path / "o", max_shard_bytes=100)
    w.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="twice"):
        w.add("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="needs"):
        w.add_pieces("b", torch.float32, [4], [torch.zeros(3)])
    w.abort()
    assert not list((tmp_path / "o").iterdir())


@pytest.mark.parametrize("method,params", [("rtn", {"bits": 4, "group_size": 16}),
                                           ("int8", {}),
                                           ("rtn", {"bits": 3, "group_size": None,
                                                    "symmetric": True})])
@pytest.mark.parametrize("tied", [True, False])
def test_streamed_artifact_equals_in_memory(bf16_dir, bf16_untied_dir, tmp_path, method, params,
                                            tied):
    src = bf16_dir if tied else bf16_untied_dir
    m = get_method(method)
    cfg = m.config.model_validate(params)
    res = stream_quantize(src, tmp_path / "s", m, cfg, max_shard_bytes=20_000)
    assert res.metrics["shards"] > 2 and res.metrics["quantized_linears"] == 28
    whole = load_pretrained(src).model
    mem = m.apply(whole, cfg, Context())
    mem.saver(mem.model, tmp_path / "m")
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert _raw(a[k]) == _raw(b[k]), k
    ca = json.loads((tmp_path / "s" / "config.json").read_text())
    cb = json.loads((tmp_path / "m" / "config.json").read_text())
    assert ca["quantization_config"] == cb["quantization_config"]
    assert ca["tie_word_embeddings"] == cb["tie_word_embeddings"] == tied
    assert ca["dtype"] == "bfloat16"  # reloads in the source's dtype (in memory: float32)
    ids = torch.tensor([[1, 17, 250, 3, 99]])
    with torch.no_grad():
        la = load_pretrained(tmp_path / "s", dtype=torch.float32).model(input_ids=ids).logits
        lb = load_pretrained(tmp_path / "m").model(input_ids=ids).logits
    assert torch.equal(la, lb)


def test_artifact_checkpoint_dequantizes_as_from_pretrained(bf16_dir, tmp_path):
    m = get_method("rtn")
    stream_quantize(bf16_dir, tmp_path, m, m.config.model_validate({"bits": 4, "group_size": 32,
                                                                     "symmetric": False}))
    loaded = load_pretrained(tmp_path).model.state_dict()
    with ArtifactCheckpoint(tmp_path) as art:
        assert "model.layers.2.self_attn.k_proj.weight" in art
        for name in art.names():
            assert torch.equal(art.tensor(name).float(), loaded[name].float()), name


def _job(src, out, stream, method="rtn", params=None, **kw):
    kw.setdefault("measure", "quality")  # the speed rounds start two processes: where tested
    stage = {"method": method, "params": {"group_size": 16} if params is None else params}
    return run_pipeline(src, [stage], out, device="cpu", stream=stream, **kw)


def test_streamed_job_reports_what_the_in_memory_job_reports(bf16_dir, tmp_path):
    s = _job(bf16_dir, tmp_path / "s", True, measure="full")
    m = _job(bf16_dir, tmp_path / "m", False, measure="full")
    rs, rm = s.report, m.report
    assert rs["stages"][0]["streamed"] and "streamed" in rs["evaluation"]
    for side in ("before", "after"):
        for k in ("params", "nonzero_params", "sparsity", "perplexity", "perplexity_other"):
            assert math.isclose(rs[side][k], rm[side][k], rel_tol=1e-6), (side, k)
        assert rs[side]["tokens_per_s"] > 0  # fits in memory: measured
    assert abs(rs["after"]["bytes"] - rm["after"]["bytes"]) < 200  # the headers' digits
    # the perplexity in the report is the artifact's, measured independently
    reloaded = load_pretrained(tmp_path / "s").model
    tok = load_pretrained(tmp_path / "s").tokenizer
    seq = min(512, reloaded.config.max_position_embeddings)
    assert math.isclose(rs["after"]["perplexity"],
                        E.perplexity(reloaded, tok, default_eval_text(), seq_len=seq,
                                     num_chunks=16), rel_tol=1e-6)
    assert (tmp_path / "s" / "tokenizer.json").exists() and (tmp_path / "s" / "report.json").exists()


def test_streamed_job_measuring_none_runs_no_perplexity_pass(bf16_dir, tmp_path, monkeypatch):
    """measure='none' streamed as in memory: no block-by-block pass (minutes on a large model),
    the sizes still reported."""
    from modelpress.compression.streaming import forward

    def no_pass(*a, **k):
        raise AssertionError("a perplexity pass ran")

    monkeypatch.setattr(forward, "blockwise_perplexity", no_pass)
    s = _job(bf16_dir, tmp_path / "s", True, measure="none")
    m = _job(bf16_dir, tmp_path / "m", False, measure="none")
    for side in ("before", "after"):
        assert "perplexity" not in s.report[side] and "perplexity" not in m.report[side]
        assert s.report[side]["params"] == m.report[side]["params"] > 0
    assert s.report["after"]["bytes"] > 0


def test_job_streams_above_the_threshold(bf16_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_STREAM_ABOVE_BYTES", "1000")
    monkeypatch.setattr("modelpress.compression.streaming.job._FIT_FRACTION", 0.0)
    out = _job(bf16_dir, tmp_path / "o", None, method="int8", params={})
    ev = out.report["evaluation"]
    assert "threshold" in ev["streamed"]["why"]
    assert "tokens_per_s" not in out.report["after"] and "not measured" in ev["tokens_per_s_absent"]
    assert out.report["after"]["perplexity"] > 0
    monkeypatch.setenv("MODELPRESS_STREAM_ABOVE_BYTES", str(10**12))
    out = _job(bf16_dir, tmp_path / "p", None, method="int8", params={})
    assert "streamed" not in out.report["evaluation"]


@pytest.mark.parametrize("method,params,why", [
    ("heads", {"ratio": 0.25}, "not one of the block-by-block methods"),
    ("magnitude", {"scope": "global"}, "scope='global'"),
    ("wanda", {"calibration_source": "self"}, "calibration_source='self'"),
])
def test_stream_refuses_what_cannot_stream(bf16_dir, tmp_path, method, params, why):
    with pytest.raises(CompressionError, match="cannot stream") as e:
        _job(bf16_dir, tmp_path / "w", True, method=method, params=params)
    assert why in str(e.value)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_streamed_job_cancels_and_leaves_no_shards(bf16_dir, tmp_path):
    from modelpress.compression.base import Cancelled
    from modelpress.compression.pipeline import JobHooks

    seen = []

    def should_stop():
        return any("block 2/" in (lbl or "") for lbl in seen)

    with pytest.raises(Cancelled):
        _job(bf16_dir, tmp_path / "c", True,
             hooks=JobHooks(progress=lambda p, lbl: seen.append(lbl), should_stop=should_stop))
    assert not list((tmp_path / "c").glob("*.safetensors")) if (tmp_path / "c").exists() else True
    assert not list((tmp_path / "c").glob(".shard-*")) if (tmp_path / "c").exists() else True


@pytest.mark.slow
def test_gguf_converted_tensor_by_tensor_equals_transformers(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    from modelpress.compression.models import load_gguf
    from modelpress.compression.streaming.gguf import convert_gguf

    d = convert_gguf(smollm2_gguf, tmp_path / "cache", max_shard_bytes=200 * 10**6)
    assert len(list(d.glob("*.safetensors"))) == 3 and (d / "tokenizer.json").exists()
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent),
                                               gguf_file=smollm2_gguf.name, dtype=torch.float32)
    conv = _tensors(d)
    rsd = ref.state_dict()
    assert set(conv) == set(rsd) - {"lm_head.weight"}  # tied: stored once
    assert all(torch.equal(conv[k], rsd[k]) for k in conv)
    # the tokenizer (built from the conversion's one metadata parse) is transformers' own
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    got = AutoTokenizer.from_pretrained(d)
    text = "In the beginning God created the heaven and the earth. <|im_start|>user\n12,345 x"
    assert type(got) is type(want) and got.get_vocab() == want.get_vocab()
    assert got(text).input_ids == want(text).input_ids
    assert got.all_special_tokens == want.all_special_tokens
    import transformers

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **k):
        calls.append(k)
        return real(cls, *a, **k)

    transformers.AutoModelForCausalLM.from_pretrained = classmethod(spy)
    try:
        lm = load_gguf(smollm2_gguf)
    finally:
        transformers.AutoModelForCausalLM.from_pretrained = classmethod(real)
    assert calls and not any("gguf_file" in k for k in calls)  # never a whole GGUF load
    ids = torch.tensor([[1, 504, 2143, 28, 253, 9000]])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert lm.tokenizer is not None


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streamed_calibrated_artifact_equals_in_memory(bf16_dir, tiny_tokenizer, tmp_path,
                                                       method):
    """gptq/awq on the calibration engine over a streamed skeleton (one block read, changed,
    kept in a scratch file at a time) write what the in-memory method writes, bit for bit."""
    from modelpress.compression.streaming.compress import stream_calibrated

    m = get_method(method)
    cfg = m.config.model_validate({"num_samples": 4, "seq_len": 64, "group_size": 16})
    res = stream_calibrated(bf16_dir, tmp_path / "s", m, cfg, scratch=tmp_path / "scratch",
                            tokenizer=tiny_tokenizer, calibration_text=None,
                            max_shard_bytes=60_000)
    assert res.metrics["quantized_linears"] == 28 and res.metrics["shards"] > 1
    whole = load_pretrained(bf16_dir).model
    mem = m.apply(whole, cfg, Context(tokenizer=tiny_tokenizer))
    mem.saver(mem.model, tmp_path / "m")
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert a.keys() == b.keys()
    assert all(_raw(a[k]) == _raw(b[k]) and a[k].dtype == b[k].dtype for k in a)
    ca = json.loads((tmp_path / "s" / "config.json").read_text())
    cb = json.loads((tmp_path / "m" / "config.json").read_text())
    assert ca["quantization_config"] == cb["quantization_config"]


def test_streamed_gptq_job(bf16_dir, tmp_path):
    params = {"num_samples": 4, "seq_len": 64, "group_size": 16}
    s = _job(bf16_dir, tmp_path / "s", True, method="gptq", params=params)
    m = _job(bf16_dir, tmp_path / "m", False, method="gptq", params=params)
    assert s.report["stages"][0]["streamed"]
    assert math.isclose(s.report["after"]["perplexity"], m.report["after"]["perplexity"],
                        rel_tol=1e-6)
    assert s.report["stages"][0]["metrics"]["calibration_tokens"] == 256
    assert not list((tmp_path / "s").glob("block-*"))


@pytest.mark.slow
def test_streamed_gguf_job(smollm2_gguf, tmp_path, monkeypatch):
    import modelpress.compression.measure.job as MJ

    # 3 windows of the eval text and 2 of the other domain's, measured block by block before
    # and after (the shipped texts would be 16 + 16 windows twice)
    other = MJ.other_domain_text()[:4_500]
    monkeypatch.setattr(MJ, "other_domain_text", lambda: other)
    out = _job(smollm2_gguf, tmp_path / "o", True, method="rtn", params={"group_size": 64},
               measure="quality", eval_text=default_eval_text()[:8_000])
    r = out.report
    assert r["stages"][0]["streamed"] and r["model_type"] == "llama"
    assert 1.0 < r["summary"]["ppl_ratio"] < 1.5 and r["summary"]["compression_ratio"] > 3
    # the other domain's text, measured in the same block-by-block passes (4-bit rounding
    # costs more on the two windows of KJV than on the wiki text: 4.19 -> 7.89)
    assert 1.0 < r["after"]["perplexity_other"] / r["before"]["perplexity_other"] < 2.5
    assert (tmp_path / "o" / "tokenizer.json").exists()


CAL = {"num_samples": 4, "seq_len": 64}


@pytest.mark.parametrize("method,params", [
    ("wanda", {"sparsity": 0.5}),
    ("wanda", {"pattern": "2:4", "sequential": False}),
    ("wanda", {"sparsity": 0.5, "owl": True, "owl_samples": 2}),
    ("sparsegpt", {"sparsity": 0.5}),
    ("sparsegpt", {"pattern": "2:4"}),
    ("admm", {"pattern": "2:4", "iterations": 4, "ramp_iterations": 2}),
    ("magnitude", {"sparsity": 0.5}),
    ("magnitude", {"pattern": "2:4"}),
])
@pytest.mark.parametrize("tied", [True, False])
def test_streamed_pruning_artifact_equals_in_memory(bf16_dir, bf16_untied_dir, tiny_tokenizer,
                                                    tmp_path, method, params, tied):
    """Pruning block by block (wanda/sparsegpt/admm on the calibration engine over a streamed
    skeleton, magnitude on each block alone) writes what the in-memory job saves: float32
    tensors, bit for bit, and the same config dtype."""
    from modelpress.compression.streaming.compress import stream_calibrated

    src = bf16_dir if tied else bf16_untied_dir
    m = get_method(method)
    cfg = m.config.model_validate({**(CAL if m.needs_calibration else {}), **params})
    if m.needs_calibration:
        res = stream_calibrated(src, tmp_path / "s", m, cfg, scratch=tmp_path / "scratch",
                                tokenizer=tiny_tokenizer, calibration_text=None,
                                max_shard_bytes=60_000)
    else:
        res = stream_quantize(src, tmp_path / "s", m, cfg, max_shard_bytes=60_000)
    assert res.fmt == "hf-safetensors" and res.metrics["shards"] > 1
    whole = load_pretrained(src).model
    mem = m.apply(whole, cfg, Context(tokenizer=tiny_tokenizer))
    assert mem.saver is None
    mem.model.save_pretrained(tmp_path / "m")
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32, k
        assert _raw(a[k]) == _raw(b[k]), k
    assert math.isclose(res.metrics["sparsity_linear"], E.linear_sparsity(mem.model), rel_tol=1e-12)
    ca = json.loads((tmp_path / "s" / "config.json").read_text())
    cb = json.loads((tmp_path / "m" / "config.json").read_text())
    assert ca["dtype"] == cb["dtype"] == "float32" and ca["tie_word_embeddings"] == tied
    assert not list((tmp_path / "scratch").glob("*.partial"))


@pytest.mark.parametrize("method,params", [("wanda", {"sparsity": 0.5, **CAL}),
                                           ("magnitude", {"pattern": "2:4"})])
def test_streamed_pruning_job(bf16_dir, tmp_path, method, params):
    s = _job(bf16_dir, tmp_path / "s", True, method=method, params=params)
    m = _job(bf16_dir, tmp_path / "m", False, method=method, params=params)
    st = s.report["stages"][0]
    assert st["streamed"] and st["format"] == "hf-safetensors" and not st["packed"]
    assert s.report["format"] == "hf-safetensors"
    assert math.isclose(st["metrics"]["sparsity_linear"], 0.5, abs_tol=1e-3)
    for k in ("params", "nonzero_params", "perplexity"):
        assert math.isclose(s.report["after"][k], m.report["after"][k], rel_tol=1e-6), k
    reloaded = load_pretrained(tmp_path / "s").model
    assert math.isclose(E.linear_sparsity(reloaded), st["metrics"]["sparsity_linear"], rel_tol=1e-12)


def test_gguf_metadata_is_parsed_once_per_file(smollm2_gguf, monkeypatch):
    """A job asks for the GGUF's config and tokenizer three times (size check, conversion,
    tokenizer); parsing its metadata takes seconds, so it is read once and handed out as copies."""
    import transformers

    from modelpress.compression.streaming import gguf

    gguf._PARSED.clear()
    c1, t1 = gguf._config_and_tokenizer(smollm2_gguf)

    def refuse(*a, **k):
        raise AssertionError("parsed the GGUF again")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    c2, t2 = gguf._config_and_tokenizer(smollm2_gguf)
    assert gguf.gguf_config_bytes(smollm2_gguf) > 4 * 100e6
    assert c2 is not c1 and c2.to_dict() == c1.to_dict()
    c2.hidden_size = 1
    assert gguf._config_and_tokenizer(smollm2_gguf)[0].hidden_size == 576
    assert t2 is not t1 and t2("hello world")["input_ids"] == t1("hello world")["input_ids"]
