"""The config checks of the files room: every template compiles.

The config layer cannot import the renderer, so ``load_config(path, more=...)``
takes these checks from above. Every command that reads a config uses
``load_checked``; a role's SIGHUP uses ``reload_config``, so a template that
does not compile is refused at reload, as at start, and the old config keeps
running. Messages name the field and never quote a template (it may hold a
literal secret).
"""

from __future__ import annotations

import os
import re

from daemon.config import Config, load_config, path_part
from daemon.errors import ConfigError
from daemon.files.render import check_templates


def _unquoted(message: str, source: str) -> str:
    """Jinja's message on one line, without the bits it quotes from the template
    ("got 'hunter2'"): a template may hold a literal secret."""
    text = re.sub(r"'([^']*)'", lambda m: "'...'" if m.group(1) in source else m.group(0), message)
    return " ".join(text.split())


def template_problems(config: Config) -> list[str]:
    """Every template's syntax error, one line each naming its field."""
    problems = []
    for i, cred in enumerate(config.credentials):
        for part, templates in (("files", cred.output.files), ("env", cred.output.env)):
            for name, source in templates.items():
                try:
                    lines = check_templates({name: source})
                except (RecursionError, ValueError, OverflowError):  # nesting depth, a 5,000-digit literal
                    lines = [f"{name}: template cannot be compiled"]
                at = f"credentials.{i}.output.{part}.{path_part(name)}"
                problems += [f"{at}: {_unquoted(line.removeprefix(f'{name}: '), source)}" for line in lines]
    return problems


def load_checked(path: str | os.PathLike[str]) -> Config:
    """``load_config``, and every template compiles (the config layer cannot import the renderer)."""
    return load_config(path, more=template_problems)


def reload_config(path: str | os.PathLike[str], current: Config) -> Config:
    """SIGHUP: the config at ``path`` again, checked as at start. Raises ``ConfigError``,
    also for a change of the store or of the notification sinks, which need a restart
    (neither role rebuilds its ``Notifier`` on a reload)."""
    new = load_checked(path)
    if new.store != current.store:
        raise ConfigError(["store: changing the store needs a restart"])
    if new.notify != current.notify:
        raise ConfigError(["notify: changing the notification sinks needs a restart"])
    return new
