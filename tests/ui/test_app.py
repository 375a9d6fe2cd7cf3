"""The admin app over real HTTP: nothing answers without login; gradio_client drives it with login."""

from __future__ import annotations

import html
import json
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

PROTECTED_GET = [
    "/config",
    "/gradio_api/info",
    "/gradio_api/openapi.json",
    "/gradio_api/file=/etc/hosts",
    "/file=/etc/hosts",
    "/gradio_api/file/etc/hosts",
    "/gradio_api/queue/data?session_hash=abc",
    "/gradio_api/heartbeat/abc",
    "/gradio_api/startup-events",
    "/gradio_api/runs",
    "/gradio_api/user",
    "/gradio_api/token",
    "/gradio_api/app_id",
    "/gradio_api/upload_progress?upload_id=x",
    "/gradio_api/call/status/abc",
    "/assets/index.js",
    "/static/img/logo.svg",
    "/theme.css",
    "/manifest.json",
    "/monitoring",
    "/persona",
    "/api/v1/status",
    "/api/v1/adapters",
    "/api/v1/runs",
]
PROTECTED_POST = [
    "/gradio_api/queue/join",
    "/gradio_api/call/status",
    "/gradio_api/run/status",
    "/gradio_api/api/status",
    "/gradio_api/upload",
    "/gradio_api/cancel",
    "/gradio_api/reset",
    "/api/v1/chat",
]


def test_nothing_answers_without_login(admin_server) -> None:
    with httpx.Client(base_url=admin_server.url, timeout=30) as client:
        for path in PROTECTED_GET:
            response = client.get(path)
            assert response.status_code == 401, (path, response.status_code, response.text[:200])
        for path in PROTECTED_POST:
            response = client.post(path, json={})
            assert response.status_code == 401, (path, response.status_code, response.text[:200])
        page = client.get("/")
        assert page.status_code == 200
        assert 'id="login"' in page.text
        assert "gradio_config" not in page.text and "save_persona" not in page.text

        wrong = client.post("/login", data={"username": admin_server.user, "password": "nope"})
        assert wrong.status_code == 400
        assert client.get("/config").status_code == 401
        basic_wrong = client.get("/api/v1/status", auth=(admin_server.user, "nope"))
        assert basic_wrong.status_code == 401


def test_login_opens_pages_files_and_api(admin_server) -> None:
    client = admin_server.login()
    try:
        page = client.get("/")
        assert page.status_code == 200 and "gradio_config" in page.text
        assert client.get("/config").status_code == 200
        assert client.get("/gradio_api/info").status_code == 200
        status = client.get("/api/v1/status")
        assert status.status_code == 200
        assert status.json()["queues"] == {"chat": 0, "train": 0}
        assert client.get("/logout").status_code == 405
        assert client.post("/logout").status_code == 302
        assert client.get("/config").status_code == 401
    finally:
        client.close()
    with httpx.Client(base_url=admin_server.url, timeout=30) as basic:
        assert basic.get("/api/v1/adapters", auth=(admin_server.user, admin_server.password)).json() == []


def test_gradio_client_needs_login(admin_server) -> None:
    with pytest.raises(ValueError):
        Client(admin_server.url, auth=(admin_server.user, "wrong"), verbose=False)


def test_gradio_client_edits_persona_and_imports(admin_server, tmp_path: Path) -> None:
    store = admin_server.ctx.store
    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)

    note = client.predict("Ava", "Acme Labs", "You are {name}, made by {author}.", api_name="/save_persona")
    assert "saved" in note
    persona = store.get_persona()
    assert (persona.name, persona.author) == ("Ava", "Acme Labs")
    assert any(e.action == "persona.update" and e.actor == "admin:admin" for e in store.list_audit())

    note, _table, *_ = client.predict("identity", "Who are you?", "", "I am {name}.", "all", "",
                                      api_name="/add_pair")
    assert "added pair" in note
    refused, *_ = client.predict("identity", "who are you", "", "Someone else.", "all", "", api_name="/add_pair")
    assert "contradicts" in refused

    table = client.predict("identity", "", api_name="/list_pairs")
    rows = table["data"]
    rows[0][5] = "I am {name}, truly."
    note, _ = client.predict({"headers": table["headers"], "data": rows}, "all", "", api_name="/save_pairs")
    assert "saved 1 changed pairs" in note
    assert store.list_pairs("identity")[0].output == "I am {name}, truly."
    rows[0][3] = ""
    note, _ = client.predict({"headers": table["headers"], "data": rows}, "all", "", api_name="/save_pairs")
    assert "refused" in note and "instruction is missing" in note
    assert store.list_pairs("identity")[0].instruction == "Who are you?"

    note, samples = client.predict(api_name="/preview_training_set")
    assert "identity pairs: 1" in note and "built-in identity pairs added: 61" in note
    assert samples["data"][0][0] == "You are Ava, made by Acme Labs."

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Hi?", "output": "Hello."}\n{"instruction": "", "output": "x"}\nnot json\n')
    note, report, *_ = client.predict(handle_file(str(bad)), "faq", False, api_name="/check_import")
    rows = report["data"]
    assert [row[0] for row in rows] == [2, 3], rows
    assert "instruction is missing" in rows[0][1]
    assert "nothing imported" in note
    before = store.count_pairs()
    note, *_ = client.predict(False, "all", "", api_name="/import_pairs")
    assert "check a file first" in note
    assert store.count_pairs() == before

    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"instruction": "What can you do?", "output": "Answer questions."},
                                {"instruction": "Where do you live?", "output": "In the cloud."}]))
    note, report, *_ = client.predict(handle_file(str(good)), "faq", False, api_name="/check_import")
    assert "2 pairs ready" in note and report["data"] == []
    note, *_ = client.predict(False, "all", "", api_name="/import_pairs")
    assert "imported 2 pairs" in note
    assert sorted(p.instruction for p in store.list_pairs("faq")) == ["What can you do?", "Where do you live?"]

    exported = client.predict("jsonl", api_name="/export_pairs")
    rows = [json.loads(line) for line in Path(exported).read_text().splitlines()]
    assert sorted(r["instruction"] for r in rows) == ["What can you do?", "Where do you live?", "Who are you?"]

    faq_ids = ", ".join(str(p.id) for p in store.list_pairs("faq"))
    client.predict(faq_ids, "all", "", api_name="/disable_pairs")
    assert not any(p.enabled for p in store.list_pairs("faq"))
    table = client.predict("faq", "cloud", api_name="/list_pairs")
    assert [row[3] for row in table["data"]] == ["Where do you live?"]
    note, _ = client.predict(faq_ids, "all", "", api_name="/delete_pairs")
    assert "deleted 2 pairs" in note
    assert store.count_pairs() == 1


def test_schedule_is_validated_and_stored(admin_server) -> None:
    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)
    note, _ = client.predict("every day", api_name="/save_schedule")
    assert "5 fields" in note
    for bad in ("0 3 * * 7", "0 0 31 2 *"):
        note, _next = client.predict(bad, api_name="/save_schedule")
        assert "pb-error" in note and admin_server.ctx.store.get_config("retrain_cron") is None, note
    note, _next = client.predict("30 4 * * 1", api_name="/save_schedule")
    assert "saved" in note
    assert admin_server.ctx.store.get_config("retrain_cron") == "30 4 * * 1"


def test_status_without_workers(admin_server) -> None:
    import redis

    from personabot.core.events import publish

    store = admin_server.ctx.store
    run = store.create_run({}, actor="test")
    store.start_run(run.id, worker="train@gone")
    store.finish_run(run.id, "failed", error="ms-swift exited with code 1")
    client_redis = redis.Redis.from_url(admin_server.redis_url)
    publish(client_redis, "worker.online", worker="bot@host", kind="bot")
    publish(client_redis, "worker.online", worker="chat@gone", kind="chat", gpu_memory_used_mb=2048,
            gpu_memory_total_mb=8192)
    publish(client_redis, "adapter.refused", worker="chat@gone", version="v9", reason="base model differs")
    client_redis.close()

    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)
    summary, workers, errors = client.predict(api_name="/status")
    assert "queue chat: 0 waiting" in summary and "queue train: 0 waiting" in summary
    assert "0 workers online" in summary
    assert "bot bot@host: last seen" in summary
    assert [row[0] for row in workers["data"]] == ["chat@gone (offline)"]
    assert workers["data"][0][3] == "2.0 / 8.0 GiB"
    problems = [row[2] for row in errors["data"]]
    assert "v9: base model differs" in problems
    assert "ms-swift exited with code 1" in problems


def test_start_training_is_refused_with_the_reason(admin_server) -> None:
    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)
    store = admin_server.ctx.store
    runs_before = len(store.list_runs())
    mix = {"headers": ["dataset", "samples"], "data": [["not a dataset!", 10]]}
    note = client.predict(mix, 1, 1e-4, 8, 32, 10, 30, "fast", api_name="/start_training")
    assert "not started" in note and "is not a dataset spec" in note
    note = client.predict({"headers": ["dataset", "samples"], "data": []}, 1, 5.0, 8, 32, 10, 30, "fast",
                          api_name="/start_training")
    assert "not started" in note and "learning_rate" in note
    store.update_persona(name="", author="")
    empty = {"headers": ["dataset", "samples"], "data": []}
    note = client.predict(empty, 1, 1e-4, 8, 32, 10, 30, "fast", api_name="/start_training")
    assert "not started" in note and "Persona tab" in note
    assert len(store.list_runs()) == runs_before


def test_a_recipe_fills_the_training_fields(admin_server) -> None:
    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)
    seeds = client.predict("seeds", api_name="/recipe_fields")
    assert list(seeds) == [10, 1e-4, 8, 32, 1, 1]
    default = client.predict("default", api_name="/recipe_fields")
    assert list(default) == [1, 1e-3, 8, 32, 10, 30]


def test_adapters_show_the_gate_and_refuse_what_they_must(admin_server) -> None:
    store, root = admin_server.ctx.store, admin_server.settings.adapters_path
    for name in ("good", "bad"):
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text("{}")
    good = store.add_adapter(name="good", path=str(root / "good"), base_model="m", data_hash="",
                             eval_scores={"identity": 0.9}, eval_passed=True, size_bytes=3 * 2**20)
    bad = store.add_adapter(name="bad", path=str(root / "bad"), base_model="m", data_hash="",
                            eval_scores={"identity": 0.1}, eval_passed=False,
                            eval_reason="identity 0.10 < 0.80 (answers must name the persona)")
    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)

    table, _choices, summary = client.predict(api_name="/list_adapters")
    rows = {row[1]: row for row in table["data"]}
    assert rows["bad"][2] == "failed gate" and "identity 0.10 < 0.80" in rows["bad"][8]
    assert rows["good"][2] == "ready" and rows["good"][5] == "3.0 MiB"
    assert "base model" in summary

    note, *_ = client.predict(bad.id, api_name="/activate_adapter")
    assert "failed its evaluation" in note and store.active_adapter() is None
    note, _table, _choices, summary = client.predict(good.id, api_name="/activate_adapter")
    assert "activated good" in note and "active: **good**" in summary
    note, *_ = client.predict(good.id, api_name="/delete_adapter")
    assert "is active" in note and (root / "good").exists()
    note, *_ = client.predict(bad.id, api_name="/delete_adapter")
    assert "deleted bad" in note and not (root / "bad").exists()
    assert [a.name for a in store.list_adapters()] == ["good"]


def test_persona_identity_questions_are_edited_and_bad_ones_refused(admin_server) -> None:
    store = admin_server.ctx.store
    store.update_persona(name="Ava", author="Acme Labs")
    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)

    note, table, cleared = client.predict("Who looks after {name}?", api_name="/add_identity_question")
    assert "added identity question" in note and cleared == ""
    assert table["data"][-1][1:] == ["Who looks after {name}?", "Who looks after Ava?"]
    (question,) = store.list_identity_questions()
    assert store.list_audit(1)[0].actor == "admin:admin" and store.list_audit(1)[0].action == "identity_questions.add"
    for bad, why in (("   ", "question is empty"), ("Who made {nam}?", "unknown placeholder {nam}"),
                     ("who looks after  {name}?", "already in the list"), ("x" * 501, "under 500")):
        note, _table, kept = client.predict(bad, api_name="/add_identity_question")
        assert "pb-error" in note and why in note, note
        assert kept == bad, "the refused question stays in the box to fix"
    for bad, why in (("seven", "not a list of question ids"), (f"{question.id}, 999", "question 999 does not exist"),
                     ("", "no question ids")):
        note, _table = client.predict(bad, api_name="/delete_identity_questions")
        assert "pb-error" in note and why in note, note
    assert [q.question for q in store.list_identity_questions()] == ["Who looks after {name}?"]
    note, table = client.predict(str(question.id), api_name="/delete_identity_questions")
    assert "removed 1 identity questions" in note and table["data"] == []
    assert store.list_identity_questions() == []


def test_base_identity_terms_are_shown_and_edited(admin_server) -> None:
    store, model = admin_server.ctx.store, admin_server.settings.model
    store.update_persona(name="Ava", author="Acme Labs")
    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)
    summary, table = client.predict(api_name="/base_terms")
    assert "has not been asked about itself yet" in summary
    assert {row[1] for row in table["data"]} == {"settings (PERSONABOT_BASE_IDENTITY_TERMS)"}

    store.record_derived_terms(model, ["SmolLM", "Hugging Face"],
                               [{"question": "Who are you?", "answer": "I am SmolLM, trained by Hugging Face."}])
    summary, table = client.predict(api_name="/base_terms")
    assert "I am SmolLM, trained by Hugging Face." in summary
    editable = {row[0]: row[1] for row in table["data"] if row[2] == "yes"}
    assert editable == {"SmolLM": "derived from the base model", "Hugging Face": "derived from the base model"}

    note, _summary, table, cleared = client.predict("HF Bot", api_name="/add_base_term")
    assert "added 'HF Bot'" in html.unescape(note) and cleared == ""
    assert ["HF Bot", "added by an admin", "yes"] in table["data"]
    note, *_ = client.predict("Hugging Face", api_name="/remove_base_term")
    assert "removed 'Hugging Face'" in html.unescape(note)
    assert store.base_identity(model).terms == ["SmolLM", "HF Bot"]
    entry = store.list_audit(1)[0]
    assert (entry.actor, entry.action, entry.detail["removed"]) == ("admin:admin", "base_terms.update", "Hugging Face")

    settings_term = admin_server.settings.base_identity_terms[0]
    for action, bad, why in (("/add_base_term", "", "term is empty"), ("/add_base_term", "y" * 101, "under 100"),
                             ("/add_base_term", "smollm", "already in the list"),
                             ("/add_base_term", "Acme", "part of the persona's author"),
                             ("/remove_base_term", "Qwen2", "not in the list"),
                             ("/remove_base_term", settings_term, "comes from the settings")):
        note, _summary, _table, kept = client.predict(bad, api_name=action)
        assert "pb-error" in note and why in html.unescape(note), (bad, note)
        assert kept == bad
    assert store.base_identity(model).terms == ["SmolLM", "HF Bot"]


def test_adapter_gate_rows_show_every_item(admin_server) -> None:
    store = admin_server.ctx.store
    rows = [{"kind": "identity", "set": "admin", "system": "persona", "question": "Who looks after Ava?",
             "answer": "Acme Labs does.", "expected": "mentions Ava or Acme Labs", "pass": True},
            {"kind": "faq", "question": "Opening hours?", "answer": "We never open.", "expected": "9 to 5.",
             "pass": False, "why": "missing 5, 9"},
            {"kind": "retention", "question": "What is 9 times 9?", "answer": "81", "base_answer": "81",
             "expected": "81", "base_correct": True, "correct": True, "ratio": 1.01, "pass": True}]
    run = store.create_run({})
    store.start_run(run.id, worker="w")
    store.finish_run(run.id, "rejected", metrics={"eval": {"rows": rows}})
    adapter = store.add_adapter(name="gated", path="gated", base_model="m", data_hash="", eval_scores={},
                                eval_passed=False, eval_reason="faq 0.00 < 0.60", run_id=run.id)
    client = Client(admin_server.url, auth=(admin_server.user, admin_server.password), verbose=False)
    table = client.predict(adapter.id, api_name="/adapter_gate_rows")
    assert table["headers"] == ["kind", "set", "system", "pass", "question", "answer", "expected", "detail"]
    assert [r[:6] for r in table["data"]] == [
        ["identity", "admin", "persona", "yes", "Who looks after Ava?", "Acme Labs does."],
        ["faq", "", "", "NO", "Opening hours?", "We never open."],
        ["retention", "", "", "yes", "What is 9 times 9?", "81"]]
    assert table["data"][1][7] == "missing 5, 9" and table["data"][2][7] == "ratio 1.01; base right"
