"""The GGUF tensor-table reader against gguf's own GGUFReader: a file written by gguf's writer
with string arrays in the metadata, a custom alignment and every kind of tensor the conversion
meets (float32, float16, bfloat16, Q8_0, Q4_1 blocks), and the real SmolLM2 GGUF."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress.compression.streaming.gguf_tensors import read_tensors


def _same_as_gguf_reader(path) -> list[str]:
    from gguf import GGUFReader

    want = GGUFReader(str(path)).tensors
    arch, got = read_tensors(path)
    assert [t.name for t in got] == [t.name for t in want]
    for g, w in zip(got, want, strict=True):
        assert g.tensor_type == w.tensor_type
        assert g.data.dtype == w.data.dtype and g.data.shape == w.data.shape
        assert np.array_equal(g.data, w.data)
    return [arch, *sorted({t.tensor_type.name for t in got})]


def test_reader_equals_gguf_reader_on_a_written_file(tmp_path):
    import gguf
    from gguf import GGMLQuantizationType as Q

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(300)])
    w.add_string("general.name", "tiny")
    w.add_uint32("llama.block_count", 2)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("a.weight", a)
    w.add_tensor("b.weight", a[:3, :5].astype(np.float16))
    bf16 = (a.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(8, 128)
    w.add_tensor("c.weight", bf16, raw_dtype=Q.BF16)
    for q in (Q.Q8_0, Q.Q4_1):
        w.add_tensor(f"{q.name}.weight", gguf.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert _same_as_gguf_reader(path) == ["llama", "BF16", "F16", "F32", "Q4_1", "Q8_0"]


@pytest.mark.slow
def test_reader_equals_gguf_reader_on_smollm2(smollm2_gguf):
    assert _same_as_gguf_reader(smollm2_gguf) == ["llama", "F32", "Q4_1", "Q8_0"]


def test_reader_refuses_what_is_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_tensors(p)
