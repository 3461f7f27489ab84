"""The web console in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright against a
live server on the tiny model, with --api-key and --admin-key on.

One server and one browser for the module. Every page records its console errors, uncaught exceptions and
the HTTP answers >= 400 it received; each test ends by checking that there were none besides the ones the
page provokes on purpose (the admin probe, the key-less first load, a refused training file).
Screenshots of every screen go to a tmp dir (printed at the end; docs/console/ holds a copy for the README).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.cli import build_parser
from server.config import settings_from_args
from tests.adapters import make_lora
from tests.server_utils import LiveServer, live_server
from tests.tiny import make_tiny_checkpoint

USER, ADMIN = "sk-console-user-1", "adm-console-admin-2"
SERVER = dict(max_model_len=256, kv_cache_blocks=64)
AXE = Path(__file__).with_name("vendor") / "axe-core" / "axe.min.js"
PROBE = "/v1/adapters/~console-admin-probe~"
# HTTP answers >= 400 the page asks for on purpose: (method, path, status)
EXPECTED_FAILURES = {("GET", "/v1/models", 401), ("PUT", PROBE, 403), ("PUT", PROBE, 404),
                     ("GET", "/v1/assistants", 404), ("GET", "/v1/fine_tuning/jobs", 404)}
DEADLINE_MS = 60_000


def chromium_path() -> str:
    path = os.environ.get("PEFTSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:  # never skipped: `make test` installs it (apt-get as root)
        pytest.fail("the console's browser tests need Debian's chromium: run `make test` as root, or "
                    "`apt-get install -y chromium`, or set PEFTSERVE_CHROMIUM to a Chromium binary")
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Watch:
    """What one page reported: console errors, uncaught exceptions, HTTP answers >= 400."""
    errors: list[str] = field(default_factory=list)
    failures: list[tuple[str, str, int]] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        def on_console(msg: Any) -> None:
            # Chromium logs every HTTP answer >= 400 as "Failed to load resource"; those are checked one by
            # one in `failures` instead.
            if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
                self.errors.append(f"console: {msg.text}")

        def on_response(r: Any) -> None:
            if r.status >= 400:
                self.failures.append((r.request.method, httpx.URL(r.url).path, r.status))

        page.on("console", on_console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("response", on_response)

    def check(self) -> None:
        assert self.errors == [], self.errors
        unexpected = [f for f in self.failures if f not in EXPECTED_FAILURES]
        assert unexpected == [], unexpected


@dataclass
class Console:
    srv: LiveServer
    browser: Any
    shots: Path
    lora: str
    base: str
    pages: list[tuple[Any, Watch]] = field(default_factory=list)

    def open(self, key: str | None, *, role: str | None = None, bypass_csp: bool = False) -> tuple[Any, Watch]:
        """A fresh browser context (nothing shared, the key only in this page's memory) on the console;
        `key` typed into the key form, and the page's role badge awaited."""
        ctx = self.browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=bypass_csp)
        ctx.set_default_timeout(DEADLINE_MS)
        page = ctx.new_page()
        watch = Watch()
        watch.attach(page)
        page.goto(self.srv.url + "/")
        if key is not None:
            page.fill("#api-key", key)
            page.click("#key-form button[type=submit]")
            page.wait_for_function("r => document.body.dataset.role === r && document.querySelector('#key-status')"
                                   ".dataset.role === r", arg=role or ("admin" if key == ADMIN else "user"))
        self.pages.append((page, watch))
        return page, watch

    def screen(self, page: Any, name: str) -> None:
        page.evaluate("n => { location.hash = '#/' + n; }", name)
        page.wait_for_selector(f"#screen-{name}:not([hidden])")

    def shot(self, page: Any, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, tiny_root: str) -> Iterator[Console]:
    from playwright.sync_api import sync_playwright  # the dev extra; never skipped

    exe = chromium_path()
    model = make_tiny_checkpoint(tiny_root)
    lora = make_lora(model, str(tmp_path_factory.mktemp("console-lora") / "qv-r4"), r=4, targets=["q_proj", "v_proj"],
                     seed=7)
    shots = tmp_path_factory.mktemp("console-screenshots")
    store = tmp_path_factory.mktemp("console-store")
    with live_server(model=model, api_key=USER, admin_key=ADMIN, adapters_dir=str(store), **SERVER) as srv, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield Console(srv, browser, shots, lora, srv.state.base_name)
        finally:
            browser.close()
            print(f"\nconsole screenshots: {shots}")


def upload_api(srv: LiveServer, name: str, adapter_dir: str) -> dict[str, Any]:
    files = [("files", (f, open(os.path.join(adapter_dir, f), "rb").read()))
             for f in ("adapter_config.json", "adapter_model.safetensors")]
    r = httpx.post(srv.url + "/v1/adapters", data={"name": name}, files=files, headers=bearer(ADMIN), timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


def chat(srv: LiveServer, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    r = httpx.post(srv.url + "/v1/chat/completions", headers=bearer(USER), timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def cell(page: Any, adapter: str, cls: str) -> str:
    return page.inner_text(f'#adapters-table tr[data-adapter="{adapter}"] td.{cls}')


def wait_text(page: Any, selector: str, pred: Callable[[str], bool], what: str, timeout_s: float = 60) -> str:
    """Polls an element's text (the page re-renders on its own timers) until `pred` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        loc = page.locator(selector)
        text = loc.inner_text() if loc.count() else ""
        if pred(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: last text {text!r} of {selector}")
        page.wait_for_timeout(200)


# ---- tests --------------------------------------------------------------------------------------------------

def test_console_is_served_and_no_ui_turns_it_off(console: Console) -> None:
    r = httpx.get(console.srv.url + "/")
    assert r.status_code == 200 and "<title>peftserve console</title>" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    js = httpx.get(console.srv.url + "/ui/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert httpx.get(console.srv.url + "/ui/adapters").text == r.text  # a screen's URL is the app
    assert httpx.get(console.srv.url + "/ui/nope.js").status_code == 404
    # --no-ui: a bare flag means true; the app built from those settings has no console routes
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve", "--no-ui"])).no_ui is True
    assert settings_from_args(parser.parse_args(["serve", "--no-ui", "false"])).no_ui is False
    off = dataclasses.replace(console.srv.state, settings=console.srv.state.settings.model_copy(update={"no_ui": True}))
    client = TestClient(create_app(off))  # no lifespan: the live server's engine keeps running alone
    for path in ("/", "/ui/", "/ui/app.js"):
        resp = client.get(path)
        assert resp.status_code == 404, (path, resp.status_code)
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/health").status_code == 200


def test_without_a_key_the_page_asks_for_one(console: Console) -> None:
    page, watch = console.open(None)
    err = page.wait_for_selector("#global-error:not([hidden])")
    assert "API key" in err.inner_text()
    assert page.is_hidden("#upload-panel")
    assert ("GET", "/v1/models", 401) in watch.failures
    # the key is held in page memory only: nothing in the URL, cookies or web storage
    page.fill("#api-key", USER)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.body.dataset.role === 'user'")
    stored = page.evaluate("[document.cookie, localStorage.length, sessionStorage.length, location.href]")
    assert stored[:3] == ["", 0, 0] and USER not in stored[3]
    assert page.context.cookies() == []
    watch.check()


def test_adapters_table_lists_an_adapter_with_its_tier_and_recent_traffic(console: Console) -> None:
    srv = console.srv
    upload_api(srv, "table-lora", console.lora)
    chat(srv, "table-lora", "warm up", 4)  # now resident on the device
    rec = httpx.get(srv.url + "/v1/adapters/table-lora", headers=bearer(USER)).json()
    assert rec["residency"] == "device"
    page, watch = console.open(ADMIN)
    console.screen(page, "adapters")
    page.wait_for_selector('#adapters-table tr[data-adapter="table-lora"]')
    assert cell(page, "table-lora", "tier") == "device"
    row = page.inner_text('#adapters-table tr[data-adapter="table-lora"]')
    assert "lora" in row.lower() and str(rec["rank"]) in row and str(rec["version"]) in row
    # traffic after the page opened shows in the 5-minute columns, from /metrics
    before_req, before_tok = int(cell(page, "table-lora", "req")), int(cell(page, "table-lora", "tok"))
    usage = [chat(srv, "table-lora", f"count me {i}", 5)["usage"] for i in range(2)]
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage)
    page.wait_for_function("""([req, tok]) => {
        const row = document.querySelector('#adapters-table tr[data-adapter="table-lora"]');
        return row && Number(row.querySelector('td.req').textContent) === req
            && Number(row.querySelector('td.tok').textContent) === tok; }""", arg=[before_req + 2, before_tok + tokens])
    console.shot(page, "adapters")
    watch.check()


def _drop_files(page: Any, files: dict[str, bytes]) -> None:
    """A drop event on the drop zone carrying `files`, as a browser fires it for a drag from the desktop."""
    page.evaluate("""files => {
        const dt = new DataTransfer();
        for (const [name, b64] of Object.entries(files)) {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            dt.items.add(new File([bytes], name));
        }
        const zone = document.querySelector('#drop-zone');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", {n: base64.b64encode(b).decode() for n, b in files.items()})


def test_upload_replace_and_delete_through_the_page(console: Console, tmp_path: Path) -> None:
    srv = console.srv
    page, watch = console.open(ADMIN)
    console.screen(page, "adapters")
    names = ("adapter_config.json", "adapter_model.safetensors")
    files = {n: Path(console.lora, n).read_bytes() for n in names}
    # 1. drag and drop the two files
    _drop_files(page, files)
    page.wait_for_function("() => document.querySelectorAll('#upload-list li').length === 2")
    page.fill("#upload-name", "dropped-lora")
    page.click("#upload-btn")
    wait_text(page, "#upload-msg", lambda t: t.startswith("Stored dropped-lora v1"), "upload answered")
    assert page.eval_on_selector("#upload-progress", "p => p.value") == 100
    page.wait_for_selector('#adapters-table tr[data-adapter="dropped-lora"]')
    stored = srv.state.store.get("dropped-lora")
    assert (srv.state.store.path("dropped-lora") / names[1]).read_bytes() == files[names[1]]
    assert stored.version == 1
    # 2. an archive through the file input (set_input_files): the name comes from the archive's
    archive = tmp_path / "archived-lora.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for n, data in files.items():
            info = tarfile.TarInfo(f"archived-lora/{n}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    page.set_input_files("#upload-files", str(archive))
    assert page.input_value("#upload-name") == "archived-lora"
    page.click("#upload-btn")
    wait_text(page, "#upload-msg", lambda t: t.startswith("Stored archived-lora v1"), "archive upload answered")
    assert (srv.state.store.path("archived-lora") / names[1]).read_bytes() == files[names[1]]
    # 3. replace: a new version from other weights
    other = make_lora(srv.state.settings.model, str(tmp_path / "other"), r=4, targets=["q_proj", "v_proj"], seed=11)
    with page.expect_file_chooser() as fc:
        page.click('button[aria-label="Replace dropped-lora"]')
    fc.value.set_files([os.path.join(other, n) for n in names])
    wait_text(page, "#upload-msg", lambda t: t == "Replaced dropped-lora: now v2.", "replace answered")
    assert srv.state.store.get("dropped-lora").version == 2
    assert (srv.state.store.path("dropped-lora") / names[1]).read_bytes() == Path(other, names[1]).read_bytes()
    # 4. delete asks first: cancel keeps it, confirm removes it
    page.click('button[aria-label="Delete archived-lora"]')
    page.wait_for_selector("#confirm-dialog[open]")
    page.keyboard.press("Enter")  # the focused button is Cancel
    page.wait_for_selector("#confirm-dialog:not([open])", state="attached")
    assert httpx.get(srv.url + "/v1/adapters/archived-lora", headers=bearer(USER)).status_code == 200
    page.click('button[aria-label="Delete archived-lora"]')
    console.shot(page, "adapters-delete-confirm")
    page.click("#confirm-ok")
    page.wait_for_selector('#adapters-table tr[data-adapter="archived-lora"]', state="detached")
    assert httpx.get(srv.url + "/v1/adapters/archived-lora", headers=bearer(USER)).status_code == 404
    console.shot(page, "adapters-upload")
    watch.check()


def test_playground_streams_base_and_adapter_side_by_side(console: Console) -> None:
    srv = console.srv
    if httpx.get(srv.url + "/v1/adapters/table-lora", headers=bearer(USER)).status_code == 404:
        upload_api(srv, "table-lora", console.lora)
    prompt, n = "Tell me a story.", 16
    want = {m: chat(srv, m, prompt, n) for m in (console.base, "table-lora")}
    texts = {m: r["choices"][0]["message"]["content"] for m, r in want.items()}
    assert texts[console.base] != texts["table-lora"], "the random LoRA must change the greedy answer"
    page, watch = console.open(USER)
    console.screen(page, "playground")
    page.select_option("#pg-model-1", console.base)
    page.select_option("#pg-model-2", "table-lora")
    page.fill("#pg-prompt", prompt)
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", str(n))
    page.click("#pg-run")
    page.wait_for_function("() => [...document.querySelectorAll('.pg-col')].map(c => c.dataset.state).join() === "
                           "'done,done'")
    for col, model in ((1, console.base), (2, "table-lora")):
        art = page.locator(f'.pg-col[data-column="{col}"]')
        assert art.locator(".pg-text").text_content() == texts[model], model
        assert int(art.get_attribute("data-chunks")) > 1, f"{model}: the answer arrived in one piece, not streamed"
        assert int(art.get_attribute("data-completion-tokens")) == want[model]["usage"]["completion_tokens"]
        assert f"completion {want[model]['usage']['completion_tokens']} tokens" in art.locator(".pg-usage").inner_text()
    page.wait_for_selector("#pg-diff:not([hidden])")
    marks = page.locator("#pg-diff pre.diff ins, #pg-diff pre.diff del").count()
    assert marks > 0
    # the diff, read without its deletions, is the adapter's answer; without its insertions, the base's
    for drop, model in (("del", "table-lora"), ("ins", console.base)):
        got = page.evaluate("""drop => { const pre = document.querySelector('#pg-diff pre.diff').cloneNode(true);
            pre.querySelectorAll(drop).forEach(e => e.remove()); return pre.textContent; }""", drop)
        assert got == texts[model]
    console.shot(page, "playground")
    watch.check()


def test_health_shows_engine_kv_queue_and_throughput(console: Console) -> None:
    srv = console.srv
    page, watch = console.open(USER)
    console.screen(page, "health")
    wait_text(page, "#hl-engine", lambda t: t == "alive", "engine alive")
    kv = page.locator("#hl-kv")
    wait_text(page, "#hl-kv", lambda t: t.endswith("/ 64"), "KV total = --kv-cache-blocks")
    used = int(kv.get_attribute("data-used"))
    assert 0 <= used <= 64
    assert page.inner_text("#hl-ready") == "ready"
    assert page.inner_text("#hl-queue") == "0 / 0"
    # the engine's slot count (what the adapter memory allows, or the --max-adapters cap)
    assert page.inner_text("#hl-slots").endswith(f"/ {srv.state.engine.stats().slots_total}")
    chat(srv, console.base, "some throughput", 24)
    page.wait_for_function("""() => { const p = document.querySelector('#hl-spark polyline');
        return p && Number(p.dataset.points) >= 2 && p.getAttribute('points').split(' ').some(
            xy => Number(xy.split(',')[1]) < 38); }""")  # a point above the zero line
    console.shot(page, "health")
    watch.check()


def test_user_key_sees_no_admin_actions_and_is_refused(console: Console) -> None:
    srv = console.srv
    if httpx.get(srv.url + "/v1/adapters/table-lora", headers=bearer(USER)).status_code == 404:
        upload_api(srv, "table-lora", console.lora)
    page, watch = console.open(USER)
    console.screen(page, "adapters")
    page.wait_for_selector('#adapters-table tr[data-adapter="table-lora"]')
    assert page.inner_text("#key-status").startswith("user")
    assert page.is_hidden("#upload-panel") and page.is_visible("#adapters-readonly")
    assert page.locator("#adapters-table button").count() == 0
    assert ("PUT", PROBE, 403) in watch.failures
    # forcing the hidden upload form open does not help: the server refuses, the page says so
    page.evaluate("document.querySelector('#upload-panel').hidden = false")
    page.set_input_files("#upload-files", [os.path.join(console.lora, n)
                                           for n in ("adapter_config.json", "adapter_model.safetensors")])
    page.fill("#upload-name", "sneaky")
    page.click("#upload-btn")
    msg = wait_text(page, "#upload-msg", lambda t: t.startswith("Upload refused"), "refusal shown")
    assert "403" in msg and "admin key" in msg
    assert httpx.get(srv.url + "/v1/adapters/sneaky", headers=bearer(USER)).status_code == 404
    watch.failures.remove(("POST", "/v1/adapters", 403))
    watch.check()


def test_assistants_and_fine_tuning_screens_show_the_servers_own(console: Console) -> None:
    """With the Assistants and Files/Fine-tuning APIs on the server: an assistant created over the API is in
    the assistants table; a JSONL uploaded through the page is refused with its bad line named, and a good
    one lands in /v1/files and in the page's file list."""
    base = console.srv.state.base_name
    with httpx.Client(base_url=console.srv.url, headers=bearer(ADMIN), timeout=30) as c:
        r = c.post("/v1/assistants", json={"name": "console-helper", "model": base, "instructions": "Be brief."})
        assert r.status_code in (200, 201), r.text
    page, watch = console.open(ADMIN)
    console.screen(page, "assistants")
    page.wait_for_selector("#as-body:not([hidden])")
    page.wait_for_selector("#as-table tbody tr:has-text('console-helper')")
    assert base in page.inner_text("#as-table tbody tr:has-text('console-helper')")
    console.shot(page, "assistants")

    console.screen(page, "fine-tuning")
    page.wait_for_selector("#ft-body:not([hidden])")
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Aye!"}]})
    bad = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    page.set_input_files("#ft-file", files=[{"name": "bad.jsonl", "mimeType": "application/jsonl",
                                             "buffer": (good + "\n" + bad + "\n").encode()}])
    page.click("#ft-upload")
    page.wait_for_selector("#ft-file-errors li")
    assert "line 2" in page.inner_text("#ft-file-errors")
    page.set_input_files("#ft-file", files=[{"name": "good.jsonl", "mimeType": "application/jsonl",
                                             "buffer": (good + "\n").encode()}])
    page.click("#ft-upload")
    page.wait_for_selector("#ft-files tbody tr:has-text('good.jsonl')")
    with httpx.Client(base_url=console.srv.url, headers=bearer(ADMIN), timeout=30) as c:
        names = [f["filename"] for f in c.get("/v1/files").json()["data"]]
        assert names.count("good.jsonl") == 1 and "bad.jsonl" not in names  # the refused file left nothing
        assert c.delete("/v1/assistants/console-helper").status_code == 200
    console.shot(page, "fine-tuning-files")
    watch.failures = [f for f in watch.failures if f != ("POST", "/v1/files", 400)]  # the bad file, on purpose
    watch.check()


def test_a_job_started_in_the_page_draws_its_loss_curve(console: Console) -> None:
    """A real fine-tuning job on the tiny model, created through the page's form: while it trains, the page's
    own polling adds training and validation loss points to the curve (>= 2 each); it ends succeeded with its
    adapter named in the jobs table."""
    page, watch = console.open(ADMIN)
    console.screen(page, "fine-tuning")
    page.wait_for_selector("#ft-body:not([hidden])")
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                     {"role": "assistant", "content": f"Aye! {w}"}]})
            for w in ("sky", "sea", "tree", "rock")]
    ids = {}
    for name, lines in (("curve-train.jsonl", rows[:3]), ("curve-valid.jsonl", rows[3:])):
        page.set_input_files("#ft-file", files=[{"name": name, "mimeType": "application/jsonl",
                                                 "buffer": ("\n".join(lines) + "\n").encode()}])
        page.click("#ft-upload")
        page.wait_for_selector(f"#ft-files tbody tr:has-text('{name}')")
        ids[name] = page.inner_text(f"#ft-files tbody tr:has-text('{name}') th")
    page.select_option("#ft-train", ids["curve-train.jsonl"])
    page.select_option("#ft-valid", ids["curve-valid.jsonl"])
    page.fill("#ft-suffix", "curve")
    page.fill("#ft-epochs", "4")  # 3 samples, batch 1: 12 steps, a validation loss after each epoch
    page.click("#ft-create button[type=submit]")
    msg = wait_text(page, "#ft-create-msg", lambda t: t.startswith("Created ftjob-"), "job created")
    job_id = msg.split()[1]
    # the curve fills in from the page's own polling of the job's events (no reload, no click)
    page.wait_for_function("""() => {
        const n = c => Number(document.querySelector(`#ft-curve polyline.${c}`)?.dataset.points || 0);
        return n('train') >= 2 && n('valid') >= 2; }""", timeout=DEADLINE_MS)
    row = f'#ft-jobs tr[data-job="{job_id}"]'
    page.wait_for_selector(f'{row} td.job-state[data-state="succeeded"]', timeout=DEADLINE_MS)
    assert f":curve:{job_id[-8:]}" in page.inner_text(row)
    with httpx.Client(base_url=console.srv.url, headers=bearer(ADMIN), timeout=30) as c:
        events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    data = [e.get("data") or {} for e in events]
    assert sum(1 for e, d in zip(events, data, strict=True) if e["type"] == "metrics" and "train_loss" in d) == 12
    train = [d for d in data if "step" in d and "train_loss" in d]  # what the page plots
    valid = [d for d in data if "step" in d and "valid_loss" in d]
    assert len(valid) == 4, valid  # after epochs 1-3 (checkpoints) and at the end
    # once the job is over, the page has drawn every point the API reports
    page.wait_for_function("([t, v]) => Number(document.querySelector('#ft-curve polyline.train').dataset.points) "
                           "=== t && Number(document.querySelector('#ft-curve polyline.valid').dataset.points) === v",
                           arg=[len(train), len(valid)])
    assert "The job has successfully completed" in page.inner_text("#ft-events")
    console.shot(page, "fine-tuning")
    watch.check()


def test_keyboard_navigation_and_labels(console: Console) -> None:
    page, watch = console.open(None)
    page.wait_for_selector("#global-error:not([hidden])")
    focused = "() => document.activeElement.id || document.activeElement.className"
    page.keyboard.press("Tab")
    assert page.evaluate(focused) == "skip"
    page.keyboard.press("Tab")
    assert page.evaluate(focused) == "api-key"
    page.keyboard.type(ADMIN)
    page.keyboard.press("Enter")  # submits the key form
    page.wait_for_function("() => document.body.dataset.role === 'admin'")
    # on from the key field: the submit button, then the screen links; Enter on one opens its screen
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent") == "Health":
            break
    else:
        raise AssertionError("Tab never reached the Health link")
    page.keyboard.press("Enter")
    page.wait_for_selector("#screen-health:not([hidden])")
    assert page.get_attribute('nav a[data-screen="health"]', "aria-current") == "page"
    # the skip link moves focus to the main content
    page.focus("a.skip")
    page.keyboard.press("Enter")
    assert page.evaluate(focused) == "main"
    # every form control of every screen has a label
    unlabelled = page.evaluate("""[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    watch.check()


def test_axe_finds_no_wcag_a_or_aa_violations(console: Console) -> None:
    page, watch = console.open(ADMIN, bypass_csp=True)  # the CSP would refuse the injected axe script
    page.add_script_tag(path=str(AXE))
    found = {}
    rendered = {"adapters": "#adapters-table tbody tr", "playground": "#pg-model-2",
                "assistants": "#as-body:not([hidden])", "fine-tuning": "#ft-body:not([hidden])",
                "health": "#hl-engine[data-ok]"}
    for screen, ready in rendered.items():
        console.screen(page, screen)
        page.wait_for_selector(ready)  # the screen's first fetches have rendered
        result = page.evaluate("""async () => (await axe.run(document, {runOnly: {type: 'tag',
            values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})).violations.map(v => ({id: v.id,
            nodes: v.nodes.map(n => n.target.join(' '))}))""")
        if result:
            found[screen] = result
    assert found == {}, json.dumps(found, indent=1)
    watch.check()


def test_assistants_are_created_edited_and_deleted_in_the_page(console: Console) -> None:
    base = console.srv.state.base_name
    page, watch = console.open(ADMIN)
    console.screen(page, "assistants")
    page.wait_for_selector("#as-form:not([hidden])")
    page.fill("#as-name", "page-bot")
    page.select_option("#as-model", base)
    page.fill("#as-instructions", "Answer in one word.")
    page.fill("#as-temperature", "0.3")
    page.fill("#as-max-tokens", "7")
    page.click("#as-save")
    wait_text(page, "#as-msg", lambda t: t == "Saved page-bot.", "the new assistant saved")
    row = "#as-table tbody tr:has-text('page-bot')"
    page.wait_for_selector(row)
    api = httpx.Client(base_url=console.srv.url, headers=bearer(ADMIN), timeout=30)
    got = api.get("/v1/assistants/page-bot").json()
    assert (got["model"], got["instructions"], got["temperature"], got["max_tokens"]) == (
        base, "Answer in one word.", 0.3, 7), got
    # it is a model id now: the playground offers it
    console.screen(page, "playground")
    page.wait_for_selector('#pg-model-1 option[value="page-bot"]', state="attached")
    console.screen(page, "assistants")
    page.wait_for_selector(row)
    # edit: the form is filled from the row; one field changed, the rest kept
    page.click('button[aria-label="Edit page-bot"]')
    assert page.input_value("#as-instructions") == "Answer in one word."
    page.fill("#as-temperature", "0.9")
    page.click("#as-save")
    wait_text(page, "#as-msg", lambda t: t == "Saved page-bot.", "the edit saved")
    got = api.get("/v1/assistants/page-bot").json()
    assert (got["temperature"], got["instructions"], got["max_tokens"]) == (0.9, "Answer in one word.", 7), got
    # delete asks first
    page.click('button[aria-label="Delete page-bot"]')
    page.wait_for_selector("#confirm-dialog[open]")
    page.click("#confirm-ok")
    page.wait_for_selector(row, state="detached")
    assert api.get("/v1/assistants/page-bot").status_code == 404
    api.close()
    watch.check()


def test_a_running_job_is_cancelled_from_the_page(console: Console) -> None:
    rows = "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(200))
    with httpx.Client(base_url=console.srv.url, headers=bearer(ADMIN), timeout=30) as api:
        fid = api.post("/v1/files", files={"file": ("many.jsonl", rows.encode())},
                       data={"purpose": "fine-tune"}).json()["id"]
        job = api.post("/v1/fine_tuning/jobs", json={
            "model": console.base, "training_file": fid, "suffix": "stopme",
            "hyperparameters": {"n_epochs": 50, "batch_size": 1}}).json()  # 10000 steps: it runs until cancelled
        page, watch = console.open(ADMIN)
        console.screen(page, "fine-tuning")
        row = f'#ft-jobs tr[data-job="{job["id"]}"]'
        page.wait_for_selector(f'{row} td.job-state[data-state="running"]')
        page.click(f'button[aria-label="Cancel {job["id"]}"]')
        page.wait_for_selector("#confirm-dialog[open]")
        page.click("#confirm-ok")
        page.wait_for_selector(f'{row} td.job-state[data-state="cancelled"]')
        got = api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert got["status"] == "cancelled" and got["fine_tuned_model"] is None
        assert page.locator(f'{row} button').count() == 1  # only the job's id link: no Cancel on a final job
    watch.check()
