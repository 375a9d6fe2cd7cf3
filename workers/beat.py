"""Celery beat: 'retrain if the persona changed' on the cron the admin edits (store key retrain_cron)."""

# Start: celery -A workers.beat:app beat
# The scheduler re-reads the cron from the store every 30 s, so an edit in the admin UI takes
# effect without restarting beat. Empty cron = never.

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery.beat import Scheduler
from celery.schedules import schedule as every

from personabot.core.settings import get_settings
from personabot.training.schedule import (
    CRON_KEY,
    CronError,
    cron_schedule,
    current_cron,
    next_retrain_time,
    set_retrain_cron,
    stored_cron,
    validate_cron,
)
from personabot.workers.app import app
from personabot.workers.client import RETRAIN_IF_CHANGED_TASK

if TYPE_CHECKING:
    from personabot.core.store import Store

log = logging.getLogger(__name__)
ENTRY_NAME = "retrain-if-changed"
REFRESH_S = 30.0
# The stale-run sweep (runs of dead train workers end failed) runs on `train` this often.
SWEEP_TASK = "personabot.train_sweep"
SWEEP_ENTRY = "sweep-stale-runs"
SWEEP_EVERY = timedelta(minutes=3)


class StoreCronScheduler(Scheduler):
    """A beat scheduler with one entry, rebuilt whenever the cron in the store changes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cron: str | None = None
        self._bad: str | None = None
        self._checked = 0.0
        self._store: Store | None = None
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
        stored = stored_cron(self._store)
        try:
            cron = validate_cron(stored)
        except CronError as error:
            if self._cron is None:
                cron = current_cron(self._store)
                log.error("the stored retrain schedule is unusable (%s); running on %r from the settings until "
                          "the admin saves a good one", error, cron)
            else:
                if stored != self._bad:
                    log.error("the stored retrain schedule is unusable (%s); keeping the last good schedule %r",
                              error, self._cron or "off")
                self._bad = stored
                return
        self._bad = None
        if cron == self._cron:
            return
        self._cron = cron
        self.schedule.clear()
        self._sweep_entry()
        if cron:
            self.schedule[ENTRY_NAME] = self.Entry(name=ENTRY_NAME, task=RETRAIN_IF_CHANGED_TASK,
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


__all__ = ["CRON_KEY", "CronError", "StoreCronScheduler", "current_cron", "next_retrain_time", "set_retrain_cron"]

app.conf.beat_scheduler = "personabot.workers.beat:StoreCronScheduler"
