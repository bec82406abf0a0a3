"""The contract every compression method follows.

A method is a pure function ``apply(model, config, ctx) -> CompressionResult`` plus a pydantic
config (``extra="forbid"``) and some facts the service needs to schedule and validate it. Methods
are registered by name in :mod:`modelpress.compression.registry`. Nothing in this package knows
about HTTP, databases or Celery: the service reaches in only through :class:`Context` callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class MethodConfig(BaseModel):
    """Base of every method's params. Unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(MethodConfig):
    """Params shared by every method that looks at activations."""

    num_samples: int = Field(32, ge=1, le=4096, description="Calibration sequences.")
    seq_len: int = Field(512, ge=8, le=8192, description="Tokens per calibration sequence.")
    calibration_source: Literal["data", "self"] = Field(
        "data",
        description="'data': the job's calibration text (uploaded dataset, --calibration-file, "
        "or the project's default); 'self': text sampled from the model itself (data-free).",
    )


class CompressionError(Exception):
    """The method cannot run on this model with these params (a user error, not a crash)."""


class UnsupportedModelError(CompressionError):
    """The method does not support this model family."""


class Cancelled(Exception):
    """Raised at a checkpoint when the job was cancelled."""


class CheckpointStore(Protocol):
    """Where long-running methods keep resumable state (the service backs it with the artifact
    store; ``modelpress compress`` with a local folder)."""

    def save(self, name: str, path: Path) -> None: ...

    def load(self, name: str, dest: Path) -> bool: ...


def _noop(*_a: Any, **_k: Any) -> None:
    return None


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (an nn.Module attribute is typed ``Tensor | Module``)."""
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return w


def hf_config(model: nn.Module) -> Any:
    """A Hugging Face model's ``config`` (a PretrainedConfig whose attributes differ by family)."""
    return model.config


def hf(model: nn.Module) -> Any:
    """``model`` for calls of the Hugging Face model API (``generate``, ``get_output_embeddings``,
    ``save_pretrained``), which nn.Module's attribute typing cannot see."""
    return model


@dataclass
class Context:
    """Everything a method may need besides the model and its config."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tokenizer: Any = None
    calibration_text: str | None = None
    eval_text: str | None = None
    work_dir: Path | None = None
    seed: int = 0
    #: ``progress(fraction_of_this_stage_0_to_1, message)``
    progress: Callable[[float, str | None], None] = _noop
    #: ``event(kind, data)``: appended to the job's event log
    event: Callable[[str, dict[str, Any]], None] = _noop
    #: ``metric(name, value, unit)``: recorded for this stage
    metric: Callable[[str, float, str | None], None] = _noop
    should_stop: Callable[[], bool] = lambda: False
    checkpoints: CheckpointStore | None = None
    #: loads another registered model (e.g. a distillation teacher) by id
    load_model: Callable[[str], nn.Module] | None = None
    #: the model as it was before the recipe started (a distillation teacher by default)
    original_model: nn.Module | None = None

    def check_cancelled(self) -> None:
        if self.should_stop():
            raise Cancelled("job cancelled")


@dataclass
class CompressionResult:
    model: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)
    #: True once weights are stored in a packed quantized format: no later stage may change them
    packed: bool = False
    #: how to write the model as a Hugging Face directory; None means ``save_pretrained``
    saver: Callable[[nn.Module, Path], None] | None = None
    #: artifact format name recorded with the artifact ("hf-safetensors", "compressed-tensors")
    format: str = "hf-safetensors"


Family = Literal["pruning", "quantization", "distillation"]


@dataclass(frozen=True)
class Method:
    name: str
    config: type[MethodConfig]
    apply: Callable[[nn.Module, Any, Context], CompressionResult]
    description: str
    family: Family
    needs_calibration: bool = False
    #: "gpu": runs on the gpu queue when a GPU worker exists; "cpu": always fine on CPU
    prefers_gpu: bool = False
    #: model_type values supported (``config.model_type``); None = any. Calibrated methods take
    #: theirs from the family table (:func:`.calib.families.supporting`)
    architectures: frozenset[str] | None = None
    #: the method packs weights (quantization): it must be the last stage of a recipe
    terminal: bool = False
    #: the method needs dense, unpacked float weights as input (every method but none so far)
    needs_float_input: bool = True
    #: extra submission-time validation against the model's config (raise CompressionError)
    validate: Callable[[Any, Any], None] | None = None
    #: how the artifact is served once loaded: ``runtime(model, config) -> model`` turns the model
    #: that plain ``from_pretrained`` returns into the method's serving form (e.g. int8 kernels);
    #: the job's ``after`` quality and speed are measured on it (counts on the loaded model).
    #: None: ``from_pretrained`` is the runtime.
    runtime: Callable[[nn.Module, Any], nn.Module] | None = None

    def check_model(self, config: Any, model_config: Any) -> None:
        """Raise CompressionError if this method cannot run with ``config`` on a model whose HF
        config is ``model_config``. Called at submission so a job never fails an hour in."""
        model_type = getattr(model_config, "model_type", None)
        if self.architectures is not None and model_type not in self.architectures:
            raise UnsupportedModelError(
                f"method {self.name!r} supports model types {sorted(self.architectures)}, "
                f"not {model_type!r}"
            )
        if self.validate is not None:
            self.validate(config, model_config)
        from .moe import check_method

        check_method(self.name, config, model_config)
