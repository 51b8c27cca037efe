"""Rotation schedules (daemon/schedule.py): every, cron with a window, jitter, not_during; and the config's refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from daemon.config import RotationConfig, load_config
from daemon.errors import ConfigError
from daemon.schedule import Blackout, Cron, Schedule, check_cron

UTC_ZONE = ZoneInfo("UTC")


def at(text: str, tz: str = "UTC") -> float:
    """A wall time from ``2026-12-01 23:00`` read in ``tz``."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def weekdays_at_3(**kw: object) -> Schedule:
    return Schedule(name="db", cron=Cron("0 3 * * 1-5", UTC_ZONE), **kw)  # type: ignore[arg-type]


def test_every_is_due_one_interval_after_the_last_rotation() -> None:
    s = Schedule(name="db", every=3600.0)
    assert s.due(last=1000.0, now=1500.0) == 4600.0
    assert s.retry_at(2000.0) == 5600.0


def test_cron_is_due_at_the_next_time_it_names_after_the_last_rotation() -> None:
    s = weekdays_at_3(window=7200.0)
    # Tuesday 2026-12-01 23:00 -> Wednesday 03:00.
    last = at("2026-12-01T23:00:00")
    assert s.due(last=last, now=last) == at("2026-12-02T03:00:00")
    # Friday 04:00 (rotated at 03:00) -> Monday 03:00: the weekend is skipped.
    friday = at("2026-12-04T03:00:00")
    assert s.due(last=friday, now=friday + 3600) == at("2026-12-07T03:00:00")


def test_a_cron_time_missed_within_its_window_is_still_due_and_one_past_it_waits_for_the_next() -> None:
    s = weekdays_at_3(window=7200.0)
    last = at("2026-12-01T03:00:00")
    # The rotator was down at Wednesday 03:00 and is back at 04:30: inside the 2h window, due at once.
    assert s.due(last=last, now=at("2026-12-02T04:30:00")) == at("2026-12-02T03:00:00")
    # Back at 05:30: the window closed, so Thursday 03:00.
    assert s.due(last=last, now=at("2026-12-02T05:30:00")) == at("2026-12-03T03:00:00")


def test_cron_is_read_in_its_time_zone_across_a_dst_change() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    s = Schedule(name="db", cron=Cron("0 3 * * *", berlin))
    # 2026-03-29 is the spring change in Berlin: 03:00 local is 01:00 UTC after it, 02:00 UTC before.
    before = s.due(last=at("2026-03-27T12:00:00", "Europe/Berlin"), now=at("2026-03-27T12:00:00", "Europe/Berlin"))
    after = s.due(last=at("2026-03-30T12:00:00", "Europe/Berlin"), now=at("2026-03-30T12:00:00", "Europe/Berlin"))
    assert datetime.fromtimestamp(before, UTC).hour == 2
    assert datetime.fromtimestamp(after, UTC).hour == 1


def test_jitter_delays_within_its_bound_differs_by_credential_and_is_the_same_on_every_call() -> None:
    last = at("2026-12-01T23:00:00")
    fire = at("2026-12-02T03:00:00")
    dues = {
        name: Schedule(name=name, cron=Cron("0 3 * * 1-5", UTC_ZONE), jitter=600.0).due(last=last, now=last)
        for name in ("a", "b", "c", "d")
    }
    assert all(fire <= d < fire + 600.0 for d in dues.values())
    assert len(set(dues.values())) > 1  # spread over the fleet
    again = Schedule(name="a", cron=Cron("0 3 * * 1-5", UTC_ZONE), jitter=600.0).due(last=last, now=last + 60)
    assert again == dues["a"]


def test_not_during_moves_a_due_time_to_the_end_of_its_window() -> None:
    office = Blackout(Cron("0 9 * * 1-5", UTC_ZONE), 8 * 3600.0)  # weekdays 09:00-17:00
    s = Schedule(name="db", every=3600.0, not_during=(office,))
    last = at("2026-12-02T08:30:00")  # due 09:30, inside the window
    assert s.due(last=last, now=last) == at("2026-12-02T17:00:00")
    saturday = at("2026-12-05T08:30:00")  # no window on Saturday
    assert s.due(last=saturday, now=saturday) == saturday + 3600.0


def test_with_cron_a_window_that_is_blocked_to_its_end_skips_to_the_next_cron_time() -> None:
    # Wednesday 02:00-06:00 blocked: the 03:00 rotation (window 2h) cannot start; Thursday's can.
    maintenance = Blackout(Cron("0 2 2 12 *", UTC_ZONE), 4 * 3600.0)
    s = weekdays_at_3(window=7200.0, not_during=(maintenance,))
    last = at("2026-12-01T23:00:00")
    assert s.due(last=last, now=last) == at("2026-12-03T03:00:00")
    # A window that ends inside the cron window lets it start at its end.
    short = Blackout(Cron("30 2 2 12 *", UTC_ZONE), 3600.0)  # 02:30-03:30
    s = weekdays_at_3(window=7200.0, not_during=(short,))
    assert s.due(last=last, now=last) == at("2026-12-02T03:30:00")


def test_a_failed_cron_rotation_is_retried_at_the_next_cron_time() -> None:
    s = weekdays_at_3(window=7200.0)
    assert s.retry_at(at("2026-12-02T03:00:05")) == at("2026-12-03T03:00:00")


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        (Schedule(name="db", cron=Cron("0 0 30 2 *", UTC_ZONE)), "cron"),
        (Schedule(name="db", cron=Cron("@daily", UTC_ZONE), jitter=3600.0, window=3600.0), "jitter"),
        (Schedule(name="db", every=60.0, not_during=(Blackout(Cron("* * * * *", UTC_ZONE), 120.0),)), "not_during"),
        (
            Schedule(
                name="db",
                cron=Cron("0 3 * * *", UTC_ZONE),
                window=3600.0,
                not_during=(Blackout(Cron("0 2 * * *", UTC_ZONE), 3 * 3600.0),),
            ),
            "not_during",
        ),
    ],
)
def test_a_schedule_that_never_fires_says_which_field(schedule: Schedule, field: str) -> None:
    never = schedule.never_fires(at("2026-12-01T23:00:00"))
    assert never is not None and never[0] == field


def test_schedules_that_fire_are_not_refused() -> None:
    now = at("2026-12-01T23:00:00")
    assert weekdays_at_3(window=7200.0, jitter=600.0).never_fires(now) is None
    assert Schedule(name="db", every=86400.0).never_fires(now) is None


@pytest.mark.parametrize("expr", ["0 3 * * * *", "61 * * * *", "0 3 * *", "@sometimes", "0 3 * * 1-5; rm"])
def test_check_cron_refuses_what_is_not_five_valid_fields(expr: str) -> None:
    with pytest.raises(ValueError):
        check_cron(expr)


def test_check_cron_takes_names_and_normalises_spaces() -> None:
    assert check_cron("@Daily") == "@daily"
    assert check_cron("0  3 * *   mon-fri") == "0 3 * * mon-fri"


def test_the_config_builds_the_schedule_and_describes_it() -> None:
    rotation = RotationConfig.model_validate(
        {
            "cron": "0 3 * * 1-5",
            "window": "2h",
            "jitter": "5m",
            "timezone": "Europe/Berlin",
            "not_during": [{"start": "0 9 * * 1-5", "duration": "8h"}],
        }
    )
    s = rotation.timing("db")
    assert s.cron is not None and s.cron.tz.key == "Europe/Berlin"
    assert (s.window, s.jitter, len(s.not_during)) == (7200.0, 300.0, 1)
    assert s.describe() == "cron 0 3 * * 1-5 (Europe/Berlin), window 2h, jitter 5m, not during 1 window(s)"


def _config(tmp_path: Path, rotation: dict[str, object]) -> Path:
    path = tmp_path / "baton.yaml"
    config = {
        "node_id": "n1",
        "store": {"kind": "local", "path": str(tmp_path / "store.db")},
        "credentials": [
            {"name": "db", "key": "app/db", "output": {"dir": str(tmp_path / "out")}, "rotation": rotation}
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("rotation", "problem"),
    [
        ({"cron": "0 0 30 2 *"}, "credentials.0.rotation.cron: the schedule never fires"),
        ({"cron": "61 * * * *"}, "credentials.0.rotation.cron: "),
        ({"cron": "@daily", "window": "1h", "jitter": "1h"}, "credentials.0.rotation.jitter: must be shorter"),
        ({"cron": "@daily", "timezone": "Mars/Olympus"}, "credentials.0.rotation.timezone: unknown time zone"),
        (
            {"every": "1h", "not_during": [{"start": "* * * * *", "duration": "5m"}]},
            "credentials.0.rotation.not_during: the schedule never fires",
        ),
        ({"every": "1h", "cron": "@daily"}, "credentials.0.rotation: rotation needs one of: every, cron"),
        ({"not_during": []}, "credentials.0.rotation: rotation needs one of: every, cron"),
    ],
)
def test_a_bad_schedule_is_a_config_error_naming_the_field(
    tmp_path: Path, rotation: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, rotation))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems
