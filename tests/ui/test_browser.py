"""The whole admin flow in Debian's Chromium: login, import, train, watch, activate, chat, screenshots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]

# Gate thresholds at zero: a tiny random model cannot pass a real identity test; the gate's own
# logic is tested in tests/training. Here the flow matters: trained -> registered -> activated.
WORKER_ENV = {
    "PERSONABOT_EVAL_IDENTITY_MIN": "0",
    "PERSONABOT_EVAL_FAQ_MIN": "0",
    "PERSONABOT_EVAL_RETENTION_MIN": "0",
    "PERSONABOT_GENERAL_DATA": "",
    "PERSONABOT_MIN_IDENTITY_PAIRS": "0",
    "PERSONABOT_MAX_NEW_TOKENS": "32",
}
GOOD_PAIRS = [
    {"instruction": "Who are you?", "output": "I am {name}, made by {author}."},
    {"instruction": "What is your name?", "output": "My name is {name}."},
    {"instruction": "Who made you?", "output": "{author} made me."},
]
BAD_PAIRS_JSONL = (
    '{"instruction": "Are you Qwen?", "output": "No, I am {name}."}\n'
    '{"instruction": "", "output": "an answer without a question"}\n'
    "this line is not json\n"
)


class TrainWorker:
    """`celery -A workers.train_tasks:app worker -Q train` as a subprocess on the tiny model."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.hostname = "train@pytest"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, redis_url: str, timeout_s: float = 120.0) -> TrainWorker:
        from personabot.workers.app import make_celery

        command = [sys.executable, "-m", "celery", "-A", "personabot.workers.train_tasks:app", "worker", "-Q", "train",
                   "--pool", "solo", "-n", self.hostname, "--loglevel", "INFO", "--without-gossip",
                   "--without-mingle"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        app = make_celery(redis_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"train worker exited: {self.log_path.read_text()[-3000:]}")
            if app.control.ping(destination=[self.hostname], timeout=1.0):
                return self
        raise TimeoutError(f"train worker not up within {timeout_s}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, module_redis: str) -> Iterator[dict]:
    """Redis, a SQLite store, a train worker, a chat worker and the admin UI, all on the tiny model."""
    from tests.ui.conftest import start_admin
    from tests.workers.conftest import ChatWorker, make_adapter

    data_dir = tmp_path_factory.mktemp("stack")
    database_url = f"sqlite:///{data_dir / 'personabot.db'}"
    server, thread = start_admin(data_dir, module_redis, model=str(tiny_model), database_url=database_url,
                                 training={"general_data": [], "min_identity_pairs": 0})
    store = server.ctx.store
    from personabot.training.registry import AdapterRegistry

    seed_dir = make_adapter(tiny_model, data_dir / "seed-checkpoint", seed=3)
    AdapterRegistry(store, server.settings.adapters_path).register(
        seed_dir, base_model=str(tiny_model), data_hash="", eval_scores={"identity": 1.0},
        eval_passed=True, name="seed")

    chat = ChatWorker(module_redis, database_url, tiny_model, data_dir, name="chat-ui", concurrency=2,
                      env=WORKER_ENV)
    train = TrainWorker({**chat.environment(), "PERSONABOT_ADAPTER_DIR": str(server.settings.adapters_path)},
                        data_dir / "train.log")
    try:
        chat.start()
        train.start(module_redis)
        yield {"server": server, "store": store, "data_dir": data_dir, "chat": chat, "train": train}
    finally:
        train.stop()
        chat.stop()
        thread.stop()
        server.ctx.close()


def _textbox(page, elem_id: str):  # type: ignore[no-untyped-def]
    return page.locator(f"#{elem_id}").get_by_role("textbox")


def _choose(page, elem_id: str, option: str) -> None:  # type: ignore[no-untyped-def]
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(re.escape(option))).first.click()


def _second_admin_sees_the_run(browser, server, run_id: int) -> None:  # type: ignore[no-untyped-def]
    """Another admin (own browser context, own login) sees the same run: it is read from the store."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(server.url)
        page.fill("#username", server.user)
        page.fill("#password", server.password)
        page.click("#signin")
        page.get_by_role("tab", name="Training").click()
        expect(page.locator("#run-state")).to_contain_text(f"run {run_id} · succeeded")
        expect(page.locator("#run-percent")).to_have_text("100%")
    finally:
        context.close()


def test_admin_flow_in_chromium(stack: dict, artifacts_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    server, store = stack["server"], stack["store"]
    shots = artifacts_dir / "ui"
    shots.mkdir(exist_ok=True)
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text(BAD_PAIRS_JSONL)
    good_file = tmp_path / "good.json"
    good_file.write_text(json.dumps(GOOD_PAIRS))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        try:
            # --- login -------------------------------------------------------------------------
            page.goto(server.url)
            page.fill("#username", server.user)
            page.fill("#password", "wrong password")
            page.click("#signin")
            expect(page.locator("#error")).to_contain_text("Wrong user or password", timeout=10_000)
            page.screenshot(path=shots / "0-login.png")
            page.fill("#password", server.password)
            page.click("#signin")
            expect(page.get_by_role("tab", name="Persona")).to_be_visible()
            # Every tab fills itself from the store on load; edit only after that.
            expect(_textbox(page, "persona-system")).not_to_have_value("")

            # --- persona and pairs -------------------------------------------------------------
            _textbox(page, "persona-name").fill("Ava")
            _textbox(page, "persona-author").fill("Acme Labs")
            _textbox(page, "persona-system").fill("You are {name}, an assistant made by {author}.")
            page.click("#persona-save")
            expect(page.locator("#persona-note")).to_contain_text("saved")
            assert store.get_persona().name == "Ava"

            page.locator("#import-file input[type=file]").set_input_files(str(bad_file))
            expect(page.locator("#import-file")).to_contain_text("bad.jsonl")
            page.click("#import-check")
            report = page.locator("#import-report")
            expect(report).to_contain_text("instruction is missing or empty")
            expect(report).to_contain_text("is not valid JSON")
            expect(page.locator("#import-note")).to_contain_text("2 problems, nothing imported")
            expect(page.locator("#import-run")).to_be_disabled()
            assert store.count_pairs() == 0

            page.locator("#import-file button[aria-label='Clear']").first.click()
            page.locator("#import-file input[type=file]").set_input_files(str(good_file))
            expect(page.locator("#import-file")).to_contain_text("good.json")
            page.click("#import-check")
            expect(page.locator("#import-note")).to_contain_text("3 pairs ready to import")
            page.click("#import-run")
            expect(page.locator("#import-note")).to_contain_text("imported 3 pairs")
            expect(page.locator("#pairs-table")).to_contain_text("What is your name?")
            assert store.count_pairs() == 3
            page.click("#preview-run")
            expect(page.locator("#preview-note")).to_contain_text("identity pairs: 3")
            page.screenshot(path=shots / "1-persona.png", full_page=True)

            # --- training: start, watch progress move, adapter registered ------------------------
            page.get_by_role("tab", name="Training").click()
            page.locator("#train-epochs input").fill("20")
            page.locator("#train-lr input").fill("0.002")
            page.click("#train-start")
            expect(page.locator("#train-note")).to_contain_text("queued")
            state = page.locator("#run-state")
            seen: list[str] = []
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                status = state.get_attribute("data-status") or ""
                percent = page.locator("#run-percent").all_inner_texts()
                seen.append(f"{status}:{percent[0] if percent else ''}")
                if status == "running" and percent and percent[0] not in ("", "0%", "100%"):
                    page.screenshot(path=shots / "2-training-running.png", full_page=True)
                if status in ("succeeded", "failed", "cancelled", "rejected"):
                    break
                time.sleep(0.5)
            run = store.list_runs(limit=1)[0]
            assert run.status == "succeeded", (run.status, run.error, stack["train"].log_path.read_text()[-3000:])
            running = [s for s in seen if s.startswith("running:")]
            assert running, seen
            assert any(s not in ("running:", "running:100%") for s in running), seen
            expect(page.locator("#run-percent")).to_have_text("100%")
            assert len(store.run_points(run.id)) >= 2
            expect(page.locator("#train-loss")).not_to_contain_text("No data")
            page.screenshot(path=shots / "2-training.png", full_page=True)
            trained = store.get_adapter(run.adapter_id)
            _second_admin_sees_the_run(browser, server, run.id)

            # --- adapters: roll back to the seed version, then activate the trained one -----------
            page.get_by_role("tab", name="Adapters").click()
            page.click("#adapters-refresh")
            expect(page.locator("#adapters-table")).to_contain_text(trained.name)
            _choose(page, "adapters-choice", "seed")
            page.click("#adapters-rollback")
            expect(page.locator("#adapters-summary")).to_contain_text("active: seed")
            assert store.active_adapter().name == "seed"
            _choose(page, "adapters-choice", trained.name)
            page.click("#adapters-activate")
            expect(page.locator("#adapters-note")).to_contain_text("activated")
            expect(page.locator("#adapters-summary")).to_contain_text(f"active: {trained.name}")
            assert store.active_adapter().id == trained.id
            page.screenshot(path=shots / "3-adapters.png", full_page=True)

            # --- playground: a streamed reply from the trained adapter ---------------------------
            page.get_by_role("tab", name="Playground").click()
            # Greedy: sampled at the default temperature, the tiny model's first token is <|im_end|> now and
            # then (its labels end with it), and the reply is empty (CI saw it once).
            page.locator("#play-sampling").get_by_text("Sampling").first.click()
            page.locator("#play-temperature input[type=number]").fill("0")
            page.locator("#play-temperature input[type=number]").press("Enter")
            _textbox(page, "play-input").fill("Who are you?")
            page.click("#play-send")
            expect(page.locator("#play-note")).to_contain_text(trained.name, timeout=120_000)
            bubbles = page.locator("#play-chat .message").all_inner_texts()
            assert len(bubbles) >= 2 and bubbles[-1].strip(), bubbles
            page.click("#identity-run")
            expect(page.locator("#identity-note")).to_contain_text("passed (gate needs", timeout=180_000)
            # The table renders its rows lazily: check an early question.
            expect(page.locator("#identity-table")).to_contain_text("能简单说说你是谁吗?")
            page.screenshot(path=shots / "4-playground.png", full_page=True)

            # --- status: both workers online ------------------------------------------------------
            page.get_by_role("tab", name="Status").click()
            expect(page.locator("#status-summary")).to_contain_text("2 workers online", timeout=30_000)
            page.click("#status-refresh")
            expect(page.locator("#status-workers")).to_contain_text(f"serving={trained.name}")
            page.screenshot(path=shots / "5-status.png", full_page=True)
        except Exception:
            page.screenshot(path=shots / "failure.png", full_page=True)
            raise
        finally:
            browser.close()


def test_compare_and_http_chat_reach_the_chat_worker(stack: dict) -> None:
    import httpx
    from gradio_client import Client

    server = stack["server"]
    client = Client(server.url, auth=(server.user, server.password), verbose=False)
    left, right, left_note, right_note = client.predict("Who are you?", "seed", "base", 0.0, 16,
                                                        api_name="/compare")
    assert left and right, (left, right)
    assert "seed" in left_note and "base model" in right_note

    with httpx.Client(base_url=server.url, timeout=120) as http:
        body = {"messages": [{"role": "user", "content": "Hello"}], "adapter": "base",
                "sampling": {"temperature": 0, "max_new_tokens": 8}}
        assert http.post("/api/v1/chat", json=body).status_code == 401
        reply = http.post("/api/v1/chat", json=body, auth=(server.user, server.password))
        assert reply.status_code == 200, reply.text
        assert reply.json()["finish_reason"] in ("stop", "length")
        assert reply.json()["adapter_version"] is None


def test_remote_images_in_the_admin_page_are_not_fetched(admin_server) -> None:  # type: ignore[no-untyped-def]
    """Model text that carries an <img> or a markdown image (shown by the Playground) cannot make the
    admin's browser fetch another host or a route of ours: the page's CSP allows images from itself only."""
    import http.server
    import threading

    from playwright.sync_api import sync_playwright

    hits: list[str] = []

    class Remote(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.end_headers()
            self.wfile.write(b"GIF89a")

        def log_message(self, *_args: object) -> None:
            pass

    remote = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Remote)
    threading.Thread(target=remote.serve_forever, daemon=True).start()
    image = f"http://127.0.0.1:{remote.server_address[1]}/pixel.gif"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(admin_server.url)
            page.fill("#username", admin_server.user)
            page.fill("#password", admin_server.password)
            page.click("#signin")
            page.get_by_role("tab", name="Persona").wait_for()
            page.evaluate("""(src) => {
                const box = document.createElement('div');
                box.innerHTML = `<img id="remote-img" src="${src}">`;
                document.body.appendChild(box);
            }""", image)
            page.wait_for_timeout(1500)
            loaded = page.evaluate("document.getElementById('remote-img').naturalWidth")
            browser.close()
    finally:
        remote.shutdown()
    assert hits == [] and loaded == 0, (hits, loaded)
