"""``files.checks.reload_config``: what a SIGHUP may change, and what it refuses because only a restart applies it."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.files.checks import load_checked, reload_config


def _write(path: Path, hook: str) -> Path:
    path.write_text(
        f"store: {{kind: local, path: {path.parent / 'store.db'}}}\n"
        "credentials: []\n"
        f'notify:\n  - {{kind: webhook, url: "https://hooks.example/{hook}"}}\n'
    )
    return path


def test_a_reload_that_changes_the_notification_sinks_is_refused_naming_notify(tmp_path: Path) -> None:
    # Neither role rebuilds its Notifier on SIGHUP: a changed sink used to be accepted and silently not used.
    path = _write(tmp_path / "baton.yaml", "old-hook-pw")
    current = load_checked(path)
    assert reload_config(path, current) == current  # unchanged: accepted
    _write(path, "new-hook-pw")
    with pytest.raises(ConfigError) as e:
        reload_config(path, current)
    assert e.value.problems == ["notify: changing the notification sinks needs a restart"]
    assert "hook-pw" not in str(e.value)
