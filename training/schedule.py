"""The retrain schedule: the admin's cron, checked by the code beat schedules with, and its next run."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from personabot.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from personabot.core.store import Store

log = logging.getLogger(__name__)
CRON_KEY = "retrain_cron"
MAX_YEARS_TO_NEXT_RUN = 5


class CronError(ValueError):
    """A retrain schedule beat cannot use; the message shows the expected form."""


def cron_schedule(cron: str) -> Any:
    """The Celery crontab beat runs for a normalised, validated 5-field cron."""
    from celery.schedules import crontab

    minute, hour, day_of_month, month_of_year, day_of_week = cron.split()
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                   day_of_week=day_of_week)


def next_run(cron: str, now: datetime | None = None) -> datetime:
    """The next time `cron` fires (UTC); CronError when it never does within MAX_YEARS_TO_NEXT_RUN."""
    from croniter import croniter

    start = now or datetime.now(UTC)
    try:
        when = croniter(cron, start, max_years_between_matches=MAX_YEARS_TO_NEXT_RUN).get_next(datetime)
    except Exception as error:  # croniter raises several unrelated types for dates that never come
        raise CronError(f"{cron!r} never fires (no such date within {MAX_YEARS_TO_NEXT_RUN} years, e.g. "
                        "31 February); pick a day every month has, like '0 3 1 * *'") from error
    if (when - start).days > 366 * MAX_YEARS_TO_NEXT_RUN:
        raise CronError(f"{cron!r} next fires on {when:%Y-%m-%d}, more than {MAX_YEARS_TO_NEXT_RUN} years away")
    return when


def validate_cron(cron: str) -> str:
    """The cron normalised, or CronError: 5 fields that both beat's crontab and the next-run reckoning accept."""
    from croniter import croniter

    cron = " ".join(cron.split())
    if not cron:
        return cron
    if len(cron.split()) != 5:
        raise CronError(f"{cron!r} must have exactly 5 fields: minute hour day month weekday, like '0 3 * * *'")
    if not croniter.is_valid(cron):
        raise CronError(f"{cron!r} is not a 5-field cron like '0 3 * * *' (minute hour day month weekday)")
    try:
        cron_schedule(cron)
    except Exception as error:  # celery's crontab parser raises ValueError and its own ParseException
        raise CronError(f"{cron!r} cannot be scheduled ({error}); use numbers, ranges, lists and steps "
                        "(weekday 0-6, Sunday = 0), like '0 3 * * 0'") from None
    next_run(cron)
    return cron


def stored_cron(store: Store, settings: Settings | None = None) -> str:
    """The admin's cron as stored (unchecked), else PERSONABOT_RETRAIN_CRON; '' = never."""
    settings = settings or get_settings()
    value = store.get_config(CRON_KEY)
    return settings.retrain_cron if value is None else value


def current_cron(store: Store, settings: Settings | None = None) -> str:
    """The usable cron: the stored one, or PERSONABOT_RETRAIN_CRON when the stored one is unusable."""
    settings = settings or get_settings()
    try:
        return validate_cron(stored_cron(store, settings))
    except CronError as error:
        log.warning("ignoring the stored retrain schedule: %s", error)
    try:
        return validate_cron(settings.retrain_cron)
    except CronError as error:
        log.error("PERSONABOT_RETRAIN_CRON is unusable (%s); scheduled retraining is off", error)
        return ""


def set_retrain_cron(store: Store, cron: str, *, actor: str) -> str:
    """Validate and save the admin's schedule ('' turns scheduled retraining off)."""
    cron = validate_cron(cron)
    store.set_config(CRON_KEY, cron, actor=actor)
    return cron


def next_retrain_time(store: Store, settings: Settings | None = None, now: datetime | None = None) -> datetime | None:
    """When beat next checks the persona (UTC), or None when scheduled retraining is off."""
    cron = current_cron(store, settings)
    if not cron:
        return None
    try:
        return next_run(cron, now)
    except CronError:
        return None
