"""Webhooks: every state change of a job with a callback URL is POSTed, signed, to a loopback
receiver; a 500 is retried with backoff; the delivery log shows the attempts; refused URLs
are 422 and write nothing."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from modelpress.client import ApiError
from modelpress.domain.webhooks import SIGNATURE_HEADER, CallbackUrlError, check_url, verify

from ..client.conftest import move


class Receiver:
    """A loopback HTTP server recording (headers, body); answers the scripted statuses, then
    200."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.got: list[tuple[dict, bytes, int]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = outer.statuses.pop(0) if outer.statuses else 200
                outer.got.append((dict(self.headers), body, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_port}/hook"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            assert time.monotonic() < deadline, f"{len(self.got)} of {n} deliveries"
            time.sleep(0.05)


@pytest.fixture
def model(client, tiny_llama_dir):
    return client.upload_model(tiny_llama_dir)


def test_state_changes_are_posted_signed_retried_and_logged(client, model):
    rx = Receiver(statuses=[500])  # the first POST fails
    secret = client.webhook_settings().secret
    job = client.submit(model.id, method="rtn", params={"bits": 8}, callback_url=rx.url)
    move(job.id, "running")
    move(job.id, "succeeded")
    rx.wait_for(3)
    bodies = [json.loads(b) for _, b, _ in rx.got]
    for headers, body, _ in rx.got:
        assert verify(secret, body, headers[SIGNATURE_HEADER])
        assert not verify("other-secret", body, headers[SIGNATURE_HEADER])
        assert not verify(secret, body + b" ", headers[SIGNATURE_HEADER])
    assert bodies[0]["to"] == bodies[1]["to"] == "running", "the 500 was retried, in order"
    assert bodies[0]["delivery_id"] == bodies[1]["delivery_id"]
    assert [bodies[0]["attempt"], bodies[1]["attempt"]] == [1, 2]
    assert bodies[2]["to"] == "succeeded" and bodies[2]["job_id"] == job.id
    log = client.job_webhooks(job.id)
    assert log.url == rx.url
    assert [(d.payload["to"], d.status, d.attempts, d.last_status_code)
            for d in log.deliveries] == [("running", "delivered", 2, 200),
                                         ("succeeded", "delivered", 1, 200)]


def test_owner_default_applies_and_failures_stop_after_max_attempts(client, model, live_api):
    rx = Receiver(statuses=[503] * 100)
    client.set_default_webhook(rx.url)
    job = client.submit(model.id, method="rtn", params={"bits": 8})
    client.cancel(job.id)  # queued -> cancelled: one delivery
    max_attempts = live_api[1].webhook_max_attempts
    deadline = time.monotonic() + 60
    while client.job_webhooks(job.id).deliveries[0].status == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    d = client.job_webhooks(job.id).deliveries[0]
    assert (d.status, d.attempts, d.last_status_code) == ("failed", max_attempts, 503)
    assert len(rx.got) == max_attempts
    client.set_default_webhook(None)
    other = client.submit(model.id, method="rtn", params={"bits": 8})
    assert client.job_webhooks(other.id).url is None


def test_refused_callback_urls_are_422_and_write_nothing(client, model, live_api):
    before = len(client.list_jobs().items)
    for url in ["ftp://example.com/x", "http://user:pw@example.com/", "not a url",
                "http://does-not-exist.invalid/"]:
        with pytest.raises(ApiError) as e:
            client.submit(model.id, method="rtn", params={"bits": 8}, callback_url=url)
        assert (e.value.status, e.value.code) == (422, "invalid_callback_url"), url
    assert len(client.list_jobs().items) == before
    for ip in ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]", "0.0.0.0"]:
        with pytest.raises(CallbackUrlError):
            check_url(f"http://{ip}/hook", allow_private=False)
    assert check_url("http://127.0.0.1/hook", allow_private=True)
    assert check_url("http://93.184.216.34/hook", allow_private=False)


def test_deleting_a_job_removes_its_webhook_rows(client, model):
    from sqlalchemy import func, select

    from modelpress.domain.db import session_scope
    from modelpress.domain.models import JobWebhook, WebhookDelivery

    rx = Receiver(statuses=[500] * 100)
    job = client.submit(model.id, method="rtn", params={"bits": 8}, callback_url=rx.url)
    move(job.id, "running")
    rx.wait_for(1)
    client.delete_job(job.id)
    with session_scope() as s:
        left = [s.scalar(select(func.count()).select_from(t).where(t.job_id == job.id))
                for t in (JobWebhook, WebhookDelivery)]
    assert left == [0, 0]
    n = len(rx.got)
    time.sleep(1.5)  # past the backoff: the deleted job's delivery is not retried
    assert len(rx.got) == n
