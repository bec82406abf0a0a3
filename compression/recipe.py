"""A job's recipe: its stages (a method and its params each) and their validation as a whole,
before any work (the API's 422s, ``modelpress compress``'s bad-input exits)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .base import CompressionError, MethodConfig
from .registry import get_method

MAX_STAGES = 8


class RecipeError(CompressionError):
    """The recipe as a whole is invalid (empty, too long, packing stage not last, ...)."""


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


def as_stages(stages: Any) -> list[Stage]:
    if isinstance(stages, dict) and "stages" in stages and len(stages) == 1:
        stages = stages["stages"]
    if not isinstance(stages, (list, tuple)):
        raise RecipeError("a recipe is a list of stages ({\"method\": ..., \"params\": {...}})")
    out: list[Stage] = []
    for i, st in enumerate(stages):
        if isinstance(st, Stage):
            out.append(st)
            continue
        if not isinstance(st, dict):
            raise RecipeError(f"stage {i}: expected an object with 'method' and 'params', "
                              f"got {type(st).__name__}")
        extra = sorted(set(st) - {"method", "params"})
        if extra:
            raise RecipeError(f"stage {i}: unknown key(s) {', '.join(map(repr, extra))}; a stage "
                              "has only 'method' and 'params'")
        if not isinstance(st.get("method"), str) or not st.get("method"):
            raise RecipeError(f"stage {i}: 'method' must be a non-empty string")
        params = st.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise RecipeError(f"stage {i}: 'params' must be an object")
        out.append(Stage(method=st["method"], params=params))
    return out


def validate_recipe(stages: list[Stage] | list[dict[str, Any]], model_config: Any = None, *,
                    resolve_model: Callable[[str], Any] | None = None) -> list[MethodConfig]:
    """Parse every stage's params with its method's config and check the chain as a whole.

    Raises :class:`RecipeError` / :class:`CompressionError` (incl. ``UnknownMethodError`` and
    ``UnsupportedModelError``) with a clear message, or ``pydantic.ValidationError`` for bad
    params. ``model_config`` (an HF config) enables the per-model checks; ``resolve_model``
    (model id -> anything, raising or returning None when unknown) checks the model ids that
    stages refer to (distillation teacher/student)."""
    parsed = as_stages(stages)
    if not parsed:
        raise RecipeError("a recipe needs at least one stage")
    if len(parsed) > MAX_STAGES:
        raise RecipeError(f"a recipe has at most {MAX_STAGES} stages, got {len(parsed)}")
    configs: list[MethodConfig] = []
    for i, st in enumerate(parsed):
        method = get_method(st.method)
        cfg = method.config.model_validate(st.params)
        if method.terminal and i != len(parsed) - 1:
            raise RecipeError(f"stage {i} ({method.name}) packs the weights and must be the last "
                              f"stage of the recipe; stage {i + 1} ({parsed[i + 1].method}) follows it")
        if model_config is not None:
            method.check_model(cfg, model_config)
        for attr in ("teacher_model_id", "student_model_id"):
            ref = getattr(cfg, attr, None)
            if ref and resolve_model is not None:
                try:
                    ok = resolve_model(ref)
                except CompressionError:
                    raise
                except Exception as e:  # noqa: BLE001 - an unknown id is the user's error
                    raise RecipeError(f"stage {i} ({method.name}): {attr} {ref!r}: {e}") from None
                if ok is None or ok is False:
                    raise RecipeError(f"stage {i} ({method.name}): {attr} {ref!r} is not a "
                                      "registered model")
        configs.append(cfg)
    return configs
