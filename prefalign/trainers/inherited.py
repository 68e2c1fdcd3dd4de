"""Inherited TRL config fields that a prefalign trainer does not honour are refused at start, never ignored.

Each trainer subclasses a TRL config and so accepts every TRL field. Those that would change a stock TRL trainer's
loss but that the subclass's objective does not use are listed per trainer; a non-default value stops the run with a
message naming the field, its value, and what to do instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


def trl_default(config_class: type, name: str):
    """The default of field ``name`` in the TRL config dataclass ``config_class`` (default factories evaluated)."""
    for field in dataclasses.fields(config_class):
        if field.name == name:
            if field.default is not dataclasses.MISSING:
                return field.default
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
            raise ValueError(f"{config_class.__name__}.{name} has no default")
    raise AttributeError(f"{config_class.__name__} has no field {name!r}")


def refuse_unhonoured_fields(args, trl_config_class: type, fields: Iterable[str], trainer_name: str,
                             reason: str = "") -> None:
    """Raise ``ValueError`` when any of ``fields`` on ``args`` differs from its default in ``trl_config_class``.

    ``fields``: the inherited fields that change the parent trainer's loss but are not part of ``trainer_name``'s
    objective. ``reason`` is appended to the message (e.g. where the trainer's own knob lives).
    """
    changed = []
    for name in fields:
        value, default = getattr(args, name), trl_default(trl_config_class, name)
        if value != default:
            changed.append(f"{name}={value!r} (default {default!r})")
    if changed:
        raise ValueError(f"{trainer_name} does not use these inherited {trl_config_class.__name__} settings, which "
                         f"would otherwise be silently ignored: {', '.join(changed)}. Leave them at their defaults."
                         + (f" {reason}" if reason else ""))
