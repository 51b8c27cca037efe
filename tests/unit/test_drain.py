"""daemon.usage.attribute.attribute(): which version each process holds, from sightings and start times.

The function is pure, so every case is built from plain values: two versions of
``db`` swapped in at t=100 and t=200, consumers matched to pids, and sightings
as the usage scan would return them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from daemon.config import ConsumerConfig, MatchConfig
from daemon.files.writer import OnDisk
from daemon.report.base import Holder
from daemon.usage.attribute import Usage, attribute
from daemon.usage.consumers import START_SLACK
from daemon.usage.scan import Sighting


def consumer(name: str, loads: str = "at-start") -> ConsumerConfig:
    return ConsumerConfig.model_validate({"name": name, "match": MatchConfig(cmdline=name), "loads": loads})


def on_disk(*versions: tuple[str, float]) -> list[OnDisk]:
    return [
        OnDisk(version=v, dirname=f"..v{v}", inodes=((1, i),), digest=v * 8, swapped_in=t)
        for i, (v, t) in enumerate(versions)
    ]


DB = on_disk(("1", 100.0), ("2", 200.0))


def run(
    *,
    sightings: Sequence[Sighting] = (),
    consumers: Sequence[ConsumerConfig] = (),
    pids: Mapping[str, Sequence[int]] | None = None,
    disk: Mapping[str, Sequence[OnDisk]] | None = None,
    current: Mapping[str, str | None] | None = None,
    started: Mapping[int, float] | None = None,
    reloaded: Mapping[int, float] | None = None,
    creds_of: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Usage]:
    by_name = {c.name: c for c in consumers}
    return attribute(
        sightings=sightings,
        consumers=by_name,
        consumer_pids=pids or {},
        on_disk=disk if disk is not None else {"db": DB},
        current=current if current is not None else {"db": "2"},
        started=started or {},
        reloaded=reloaded or {},
        exes={pid: f"/usr/bin/p{pid}" for ps in (pids or {}).values() for pid in ps},
        creds_of=creds_of if creds_of is not None else {name: ["db"] for name in by_name},
    )


def held(usage: dict[str, Usage], cred: str = "db") -> dict[str, list[int]]:
    return {v: [h.pid for h in hs] for v, hs in usage.get(cred, Usage()).holders.items()}


# ---------------------------------------------------------------- sightings


def test_an_fd_sighting_wins_over_the_start_time() -> None:
    # Started after version 2 was swapped in, but seen holding version 1 open.
    usage = run(
        sightings=[Sighting(10, "/usr/bin/app", "db", "1", "fd")],
        consumers=[consumer("app")],
        pids={"app": [10]},
        started={10: 250.0},
    )

    assert held(usage) == {"1": [10]}
    assert usage["db"].holders["1"] == [Holder(10, "/usr/bin/app", "app", "fd", "1")]


def test_a_process_seen_holding_two_versions_is_listed_under_both() -> None:
    usage = run(
        sightings=[Sighting(10, "/usr/bin/app", "db", "1", "fd"), Sighting(10, "/usr/bin/app", "db", "2", "environ")],
        consumers=[consumer("app")],
        pids={"app": [10]},
    )

    assert held(usage) == {"1": [10], "2": [10]}
    assert usage["db"].holders["2"][0].how == "environ"


def test_an_unmanaged_holder_is_reported_with_no_consumer() -> None:
    usage = run(sightings=[Sighting(77, "/usr/bin/cat", "db", "1", "fd")], consumers=[consumer("app")], pids={})

    assert usage["db"].holders == {"1": [Holder(77, "/usr/bin/cat", None, "fd", "1")]}
    assert usage["db"].count("1") == 1
    assert usage["db"].count("2") == 0


# ---------------------------------------------------------------- start time


def test_a_read_once_consumer_started_before_a_swap_holds_the_old_version() -> None:
    usage = run(consumers=[consumer("app")], pids={"app": [10]}, started={10: 150.0})

    assert held(usage) == {"1": [10]}
    assert usage["db"].holders["1"] == [Holder(10, "/usr/bin/p10", "app", "start-time", "1")]


def test_a_read_once_consumer_started_after_the_swap_holds_the_new_version() -> None:
    usage = run(consumers=[consumer("app")], pids={"app": [10]}, started={10: 250.0})

    assert held(usage) == {"2": [10]}


def test_a_consumer_started_within_the_clock_slack_of_the_swap_counts_as_holding_the_old_version() -> None:
    # Start times are good to ~10 ms: when unsure, the older version is held (and blocks retirement).
    assert held(run(consumers=[consumer("app")], pids={"app": [10]}, started={10: 200.0})) == {"1": [10]}
    just_after = 200.0 + 2 * START_SLACK
    assert held(run(consumers=[consumer("app")], pids={"app": [10]}, started={10: just_after})) == {"2": [10]}


def test_a_reload_after_the_swap_moves_the_consumer_to_the_new_version() -> None:
    for loads in ("at-start", "on-reload"):
        usage = run(consumers=[consumer("app", loads)], pids={"app": [10]}, started={10: 150.0}, reloaded={10: 210.0})
        assert held(usage) == {"2": [10]}, loads


def test_a_reload_before_the_swap_does_not_move_the_consumer() -> None:
    usage = run(consumers=[consumer("app")], pids={"app": [10]}, started={10: 120.0}, reloaded={10: 180.0})

    assert held(usage) == {"1": [10]}


def test_a_consumer_started_before_every_known_version_holds_the_oldest() -> None:
    usage = run(consumers=[consumer("app")], pids={"app": [10]}, started={10: 5.0})

    assert held(usage) == {"1": [10]}


def test_the_order_of_versions_on_disk_does_not_matter() -> None:
    usage = run(
        consumers=[consumer("app")],
        pids={"app": [10]},
        started={10: 150.0},
        disk={"db": list(reversed(DB))},
    )

    assert held(usage) == {"1": [10]}


def test_with_nothing_on_disk_a_read_once_consumer_holds_the_current_version() -> None:
    usage = run(consumers=[consumer("app")], pids={"app": [10]}, started={10: 150.0}, disk={"db": []})

    assert held(usage) == {"2": [10]}


def test_with_nothing_on_disk_and_no_current_version_nothing_is_attributed() -> None:
    usage = run(
        consumers=[consumer("app")], pids={"app": [10]}, started={10: 150.0}, disk={"db": []}, current={"db": None}
    )

    assert usage == {}


def test_a_per_use_consumer_is_never_attributed_by_start_time() -> None:
    usage = run(consumers=[consumer("cli", "per-use")], pids={"cli": [10, 11]}, started={10: 150.0, 11: 250.0})

    assert usage == {}


def test_a_per_use_consumer_seen_holding_a_version_is_attributed_by_the_sighting() -> None:
    usage = run(
        sightings=[Sighting(11, "/usr/bin/cli", "db", "2", "fanotify")],
        consumers=[consumer("cli", "per-use")],
        pids={"cli": [10, 11]},
        started={10: 150.0, 11: 150.0},
    )

    assert usage["db"].holders == {"2": [Holder(11, "/usr/bin/cli", "cli", "fanotify", "2")]}


def test_a_sighted_process_of_a_consumer_is_not_also_attributed_by_start_time() -> None:
    usage = run(
        sightings=[Sighting(10, "/usr/bin/app", "db", "2", "fd")],
        consumers=[consumer("app")],
        pids={"app": [10, 11]},
        started={10: 150.0, 11: 150.0},
    )

    # pid 10 is seen on version 2 (it reopened the file); pid 11 is only known by start time.
    assert held(usage) == {"2": [10], "1": [11]}


# ---------------------------------------------------------------- two credentials


def run_under_db_and_api(sightings: Sequence[Sighting] = ()) -> dict[str, Usage]:
    """pid 10 of consumer ``app``, which uses db and api, started at 250: after db's swap to 2, before api's to 6."""
    return run(
        sightings=sightings,
        consumers=[consumer("app")],
        pids={"app": [10]},
        started={10: 250.0},
        disk={"db": DB, "api": on_disk(("5", 120.0), ("6", 300.0))},
        current={"db": "2", "api": "6"},
        creds_of={"app": ["db", "api"]},
    )


def test_a_consumer_under_two_credentials_is_attributed_per_credential() -> None:
    usage = run_under_db_and_api()

    # Started after db's swap to 2 but before api's swap to 6.
    assert held(usage, "db") == {"2": [10]}
    assert held(usage, "api") == {"5": [10]}


def test_a_sighting_under_one_credential_does_not_hide_the_other() -> None:
    usage = run_under_db_and_api(sightings=[Sighting(10, "/usr/bin/app", "db", "1", "fd")])

    assert held(usage, "db") == {"1": [10]}
    assert held(usage, "api") == {"5": [10]}


def test_holders_are_sorted_by_pid() -> None:
    usage = run(consumers=[consumer("app")], pids={"app": [30, 10, 20]}, started={30: 150.0, 10: 150.0, 20: 150.0})

    assert held(usage) == {"1": [10, 20, 30]}
