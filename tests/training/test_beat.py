"""The retrain schedule: the admin's cron from the store, the settings fallback, live edits in beat."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from personabot.workers.app import app
from personabot.workers.beat import (
    ENTRY_NAME,
    SWEEP_ENTRY,
    SWEEP_TASK,
    CronError,
    StoreCronScheduler,
    current_cron,
    next_retrain_time,
    set_retrain_cron,
)
from personabot.workers.client import RETRAIN_IF_CHANGED_TASK


def test_the_store_cron_overrides_the_setting(sqlite_store, settings_env) -> None:
    settings = settings_env(retrain_cron="0 3 * * *")
    now = datetime(2026, 11, 21, 13, 0, tzinfo=UTC)
    assert current_cron(sqlite_store, settings) == "0 3 * * *"
    assert next_retrain_time(sqlite_store, settings, now) == datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
    set_retrain_cron(sqlite_store, "30  14 * * 1-5", actor="admin")
    assert current_cron(sqlite_store, settings) == "30 14 * * 1-5"
    assert next_retrain_time(sqlite_store, settings, now) == datetime(2026, 11, 23, 14, 30, tzinfo=UTC)
    set_retrain_cron(sqlite_store, "", actor="admin")
    assert next_retrain_time(sqlite_store, settings, now) is None
    with pytest.raises(CronError, match="5 fields"):
        set_retrain_cron(sqlite_store, "every night", actor="admin")
    sqlite_store.set_config("retrain_cron", "61 * * * *")
    assert current_cron(sqlite_store, settings) == "0 3 * * *", "a bad stored value falls back to the setting"


def test_beat_follows_edits_without_a_restart(sqlite_store, settings_env, monkeypatch) -> None:
    settings_env()
    monkeypatch.setenv("PERSONABOT_DATABASE_URL", sqlite_store.url)
    monkeypatch.setenv("PERSONABOT_RETRAIN_CRON", "0 3 * * *")
    from personabot.core.settings import reset_settings

    reset_settings()
    scheduler = StoreCronScheduler(app=app, lazy=True)
    scheduler.setup_schedule()
    entry = scheduler.schedule[ENTRY_NAME]
    assert entry.task == RETRAIN_IF_CHANGED_TASK
    assert (entry.schedule.hour, entry.schedule.minute) == ({3}, {0})
    set_retrain_cron(sqlite_store, "15 */6 * * *", actor="admin")
    scheduler.refresh()
    entry = scheduler.schedule[ENTRY_NAME]
    assert (entry.schedule.hour, entry.schedule.minute) == ({0, 6, 12, 18}, {15})
    set_retrain_cron(sqlite_store, "", actor="admin")
    scheduler.refresh()
    assert ENTRY_NAME not in scheduler.schedule
    sweep = scheduler.schedule[SWEEP_ENTRY]
    assert sweep.task == SWEEP_TASK, "runs of dead workers are swept even when retraining is off"
    assert app.amqp.router.route({}, SWEEP_TASK)["queue"].name == "train"
    scheduler.close()


@pytest.mark.parametrize("cron", ["0 3 * * 7", "0 3 L * *", "0 3 ? * *", "0 3 15W * *", "0 0 31 2 *"])
def test_crons_beat_cannot_use_are_refused(sqlite_store, cron: str) -> None:
    with pytest.raises(CronError):
        set_retrain_cron(sqlite_store, cron, actor="admin")
    assert sqlite_store.get_config("retrain_cron") is None


def test_beat_keeps_the_last_good_schedule_on_a_bad_stored_value(sqlite_store, settings_env, monkeypatch,
                                                                 caplog) -> None:
    settings_env()
    monkeypatch.setenv("PERSONABOT_DATABASE_URL", sqlite_store.url)
    from personabot.core.settings import reset_settings

    reset_settings()
    set_retrain_cron(sqlite_store, "15 4 * * *", actor="admin")
    scheduler = StoreCronScheduler(app=app, lazy=True)
    scheduler.setup_schedule()
    for bad in ("0 3 * * 7", "0 0 31 2 *"):
        sqlite_store.set_config("retrain_cron", bad)
        scheduler.refresh()
        entry = scheduler.schedule[ENTRY_NAME]
        assert (entry.schedule.hour, entry.schedule.minute) == ({4}, {15})
        assert SWEEP_ENTRY in scheduler.schedule
        assert "keeping the last good schedule '15 4 * * *'" in caplog.text
    assert next_retrain_time(sqlite_store) is not None, "the Training tab still loads"
    scheduler.close()
