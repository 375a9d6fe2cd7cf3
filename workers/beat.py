"""Celery beat: 'retrain if the persona changed' on the cron the admin edits (store key retrain_cron)."""

# Start: celery -A workers.beat:app beat
# The scheduler re-reads the cron from the store every 30 s, so an edit in the admin UI takes
# effect without restarting beat. Empty cron = never.

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.beat import Scheduler
from celery.schedules import crontab
from celery.schedules import schedule as every

from personabot.core.settings import Settings, get_settings
from personabot.workers.app import app
from personabot.workers.client import MAYBE_RETRAIN_TASK

log = logging.getLogger(__name__)
CRON_KEY = "retrain_cron"
ENTRY_NAME = "maybe-retrain"
REFRESH_S = 30.0
# The stale-run sweep (runs of dead train workers end failed) runs on `train` this often.
SWEEP_TASK = "personabot.train_sweep"
SWEEP_ENTRY = "sweep-stale-runs"
SWEEP_EVERY = timedelta(minutes=3)


class CronError(ValueError):
    """A retrain schedule is not a 5-field cron; the message shows the expected form."""


def validate_cron(cron: str) -> str:
    from croniter import croniter

    cron = " ".join(cron.split())
    if cron and not croniter.is_valid(cron):
        raise CronError(f"{cron!r} is not a 5-field cron like '0 3 * * *' (minute hour day month weekday)")
    if cron and len(cron.split()) != 5:
        raise CronError(f"{cron!r} must have exactly 5 fields: minute hour day month weekday")
    return cron


def current_cron(store: Any, settings: Settings | None = None) -> str:
    """The admin's cron from the store, else PERSONABOT_RETRAIN_CRON; '' = never."""
    settings = settings or get_settings()
    value = store.get_config(CRON_KEY)
    if value is None:
        return settings.retrain_cron
    try:
        return validate_cron(value)
    except CronError as error:
        log.warning("ignoring the stored retrain schedule: %s", error)
        return settings.retrain_cron


def set_retrain_cron(store: Any, cron: str, *, actor: str) -> str:
    """Validate and save the admin's schedule ('' turns scheduled retraining off)."""
    cron = validate_cron(cron)
    store.set_config(CRON_KEY, cron, actor=actor)
    return cron


def cron_schedule(cron: str) -> crontab:
    minute, hour, day_of_month, month_of_year, day_of_week = cron.split()
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                   day_of_week=day_of_week)


def next_retrain_time(store: Any, settings: Settings | None = None, now: datetime | None = None) -> datetime | None:
    """When beat next checks the persona (UTC), or None when scheduled retraining is off."""
    from croniter import croniter

    cron = current_cron(store, settings)
    if not cron:
        return None
    start = now or datetime.now(UTC)
    return croniter(cron, start).get_next(datetime)


class StoreCronScheduler(Scheduler):
    """A beat scheduler with one entry, rebuilt whenever the cron in the store changes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cron: str | None = None
        self._checked = 0.0
        self._store: Any = None
        kwargs.setdefault("max_interval", REFRESH_S)
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        self.refresh()

    def _sweep_entry(self) -> None:
        self.schedule[SWEEP_ENTRY] = self.Entry(name=SWEEP_ENTRY, task=SWEEP_TASK,
                                                schedule=every(SWEEP_EVERY), app=self.app)

    def refresh(self) -> None:
        if self._store is None:
            from personabot.core.store import Store

            self._store = Store(get_settings().db_url)
        self._checked = time.monotonic()
        cron = current_cron(self._store)
        if cron == self._cron:
            return
        self._cron = cron
        self.schedule.clear()
        self._sweep_entry()
        if cron:
            self.schedule[ENTRY_NAME] = self.Entry(name=ENTRY_NAME, task=MAYBE_RETRAIN_TASK,
                                                   schedule=cron_schedule(cron), app=self.app)
        log.info("retrain schedule: %s", cron or "off")

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if time.monotonic() - self._checked >= REFRESH_S:
            self.refresh()
        return super().tick(*args, **kwargs)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        super().close()


app.conf.beat_scheduler = "personabot.workers.beat:StoreCronScheduler"
