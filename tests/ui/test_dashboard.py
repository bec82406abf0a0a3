"""The dashboard as a person uses it, in headless Chromium (Debian's chromium + chromedriver,
through selenium): enter the key, submit a job through the form built from /v1/methods' JSON
Schemas, watch it reach `succeeded` on the page (live, from the event stream), see its events,
metrics and download button, and the model's comparison table and plot. A screenshot is saved
under the test's tmp dir."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(DRIVER)),
                                 reason="needs Debian's chromium and chromium-driver "
                                 "(.ci/run installs them)")]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1000"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()


def test_submit_through_the_form_and_watch_it_succeed(service, browser, tiny_llama_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    from modelpress.client import Client

    base, key, up = service
    with Client(base, key) as c:
        model = c.upload_model(tiny_llama_dir, name="tiny-ui")
    wait = WebDriverWait(browser, 30)
    browser.get(base + "/ui")
    wait.until(EC.presence_of_element_located((By.ID, "api-key"))).send_keys(key)
    browser.find_element(By.ID, "login-button").click()
    wait.until(EC.presence_of_element_located((By.ID, "jobs")))
    assert browser.execute_script("return sessionStorage.getItem('modelpress-key')") == key

    browser.get(base + "/ui#/submit")
    wait.until(EC.presence_of_element_located((By.ID, "submit-form")))
    Select(browser.find_element(By.ID, "model")).select_by_value(model.id)
    Select(browser.find_element(By.ID, "method")).select_by_value("magnitude")
    sparsity = wait.until(EC.presence_of_element_located((By.ID, "param-sparsity")))
    assert sparsity.get_attribute("value") == "0.5", "the schema's default fills the field"
    assert Select(browser.find_element(By.ID, "param-scope")).first_selected_option.text == "layer"
    sparsity.clear()
    sparsity.send_keys("0.6")
    browser.find_element(By.ID, "submit-button").click()

    wait.until(lambda d: "#/jobs/" in d.current_url)
    job_id = browser.current_url.rsplit("/", 1)[1]

    def state_text(css: str):
        def get(d):
            try:
                return d.find_element(By.CSS_SELECTOR, css).text
            except Exception:  # noqa: BLE001 - re-rendered between find and text
                return None
        return get

    def wait_for(get, states, timeout):
        """The first state in ``states`` the page shows, read once (the page re-renders)."""
        def seen(d):
            text = get(d)
            return text if text in states else False
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(seen)

    # the job page follows the job live: queued -> running without a reload
    on_job = state_text("#job-summary [data-role=state]")
    seen = wait_for(on_job, ("running", "succeeded", "failed"), 120)
    assert seen == "running", "loading and evaluating the model takes seconds"
    # ...and so does the jobs list: running -> succeeded without a reload
    browser.get(base + "/ui#/jobs")
    row = state_text(f"#job-{job_id} [data-role=state]")
    first = wait_for(row, ("queued", "running", "succeeded", "failed", "cancelled"), 30)
    last = wait_for(row, ("succeeded", "failed", "cancelled"), 300)
    assert first == "running" and last == "succeeded", (first, last, up.text()[-3000:])
    browser.save_screenshot(str(tmp_path / "jobs.png"))
    browser.get(base + f"/ui#/jobs/{job_id}")
    wait_for(on_job, ("succeeded", "failed", "cancelled"), 300)
    WebDriverWait(browser, 30).until(EC.presence_of_element_located((By.ID, "download")))
    shot = tmp_path / "job-succeeded.png"
    browser.save_screenshot(str(shot))
    assert on_job(browser) == "succeeded", up.text()[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    kinds = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#events tr td:nth-child(3)")]
    assert kinds[0] == "submitted" and kinds.count("state") == 2, kinds
    assert browser.find_element(By.CSS_SELECTOR, "#metrics").text

    with Client(base, key) as c:
        job = c.get_job(job_id)
    assert job.state == "succeeded" and job.params == {"sparsity": 0.6, "scope": "layer"}

    browser.get(base + f"/ui#/models/{model.id}")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#plot svg")))
    rows = browser.find_elements(By.CSS_SELECTOR, "#comparison tr")
    assert any(job_id[:6] in r.get_attribute("innerHTML") for r in rows)
    browser.save_screenshot(str(tmp_path / "model.png"))
