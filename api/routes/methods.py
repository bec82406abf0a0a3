"""/v1/methods: what can be run, with each method's params as JSON Schema."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import CurrentOwner, UnitOfWorkRoute
from ..schemas import MethodList, MethodOut

router = APIRouter(prefix="/v1/methods", tags=["methods"], route_class=UnitOfWorkRoute)


@router.get("", response_model=MethodList, summary="List compression methods")
def list_methods(_owner: CurrentOwner) -> MethodList:
    from modelpress.compression.registry import methods

    return MethodList(items=[
        MethodOut(name=m.name, family=m.family, description=m.description,
                  needs_calibration=m.needs_calibration, prefers_gpu=m.prefers_gpu,
                  architectures=sorted(m.architectures) if m.architectures is not None else None,
                  terminal=m.terminal, params_schema=m.config.model_json_schema())
        for m in sorted(methods().values(), key=lambda m: (m.family, m.name))])
