"""/v1/webhooks: your default callback URL and signing secret; /v1/jobs/{id}/webhooks: a job's
delivery log."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from modelpress.domain.models import JobWebhook, WebhookDelivery
from modelpress.domain.webhooks import CallbackUrlError, check_url, owner_settings

from ..deps import CurrentOwner, DbSession, ReadSession, Settings, UnitOfWorkRoute
from ..errors import Unprocessable
from ..schemas import DeliveryOut, JobWebhooksOut, WebhookDefaultIn, WebhookSettingsOut
from ..services.jobs import get_job

router = APIRouter(tags=["webhooks"], route_class=UnitOfWorkRoute)


@router.get("/v1/webhooks", response_model=WebhookSettingsOut,
            summary="Your webhook settings and signing secret")
def get_webhooks(session: DbSession, owner: CurrentOwner) -> WebhookSettingsOut:
    row = owner_settings(session, owner, create=True)
    return WebhookSettingsOut(default_url=row.default_url, secret=row.secret)


@router.put("/v1/webhooks/default", response_model=WebhookSettingsOut,
            summary="Set (or clear) the default callback URL of your jobs",
            responses={422: {"description": "Not an http(s) URL, or a refused address"}})
def put_default(body: WebhookDefaultIn, session: DbSession, owner: CurrentOwner,
                settings: Settings) -> WebhookSettingsOut:
    if body.url is not None:
        try:
            check_url(body.url, allow_private=settings.webhook_allow_private)
        except CallbackUrlError as e:
            raise Unprocessable(str(e), code="invalid_callback_url") from None
    row = owner_settings(session, owner, create=True)
    row.default_url = body.url
    return WebhookSettingsOut(default_url=row.default_url, secret=row.secret)


@router.get("/v1/jobs/{job_id}/webhooks", response_model=JobWebhooksOut,
            summary="A job's webhook delivery log")
def job_webhooks(job_id: str, session: ReadSession, owner: CurrentOwner) -> JobWebhooksOut:
    get_job(session, owner, job_id, children=False)
    url = session.scalar(select(JobWebhook.url).where(JobWebhook.job_id == job_id))
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                           .order_by(WebhookDelivery.id)).all()
    return JobWebhooksOut(url=url, deliveries=[DeliveryOut.model_validate(r) for r in rows])
