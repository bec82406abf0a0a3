"""compression/models.py: loading what the service compresses."""

from __future__ import annotations

import torch

from modelpress.compression import get_method, parse_params
from modelpress.compression.base import Context
from modelpress.compression.models import load_pretrained, save_model


def test_compressed_tensors_artifact_loads_as_a_movable_model(tiny_llama, tmp_path):
    """compressed-tensors 0.19 loads an artifact with every module offloaded to the CPU (its
    forward moves the inputs back to the CPU), so ``.to("cuda")`` left the computation on the
    CPU and the int8 runtime's CUDA weights met CPU activations (seen on an H200). Loaded by the
    service, the model computes wherever it is moved; "meta" shows it on a CPU-only machine: an
    offloaded module cannot even be moved there."""
    res = get_method("rtn").apply(tiny_llama, parse_params("rtn", {"bits": 4, "group_size": 16}),
                                  Context(device=torch.device("cpu")))
    save_model(res.model, None, tmp_path, saver=res.saver)
    model = load_pretrained(tmp_path).model
    ids = torch.tensor([[5, 9, 17]])
    with torch.no_grad():
        expect = model(input_ids=ids).logits
    moved = model.to("meta")
    with torch.no_grad():
        out = moved(input_ids=ids.to("meta")).logits
    assert out.device.type == "meta" and out.shape == expect.shape
    assert all(p.device.type == "meta" for p in moved.parameters())
