"""How a jobcloud deployable gets its settings: the mechanics its config.py
shares with the others, and nothing else.

Each deployable (proxy/, vm_provisioning/, and worker/) keeps its own frozen
dataclass of settings with a reason beside every default, its own range
checks and its own ConfigError, because what a setting means is its
package's business. What is the same for all of them is how a value gets
there, and that is here: defaults < one TOML file (its [section] table, or
its top level) < PREFIX_NAME environment variables < overrides (command-line
flags, tests); every value coerced to the type of its field's default, so
"8" from the environment and 8 from the file are the same setting, and
"lots", 2.5 for an integer or true for a number are refused, naming the
setting. Copies of this in each package had drifted apart in exactly those
refusals. proxy/config.py and vm_provisioning/config.py load through it;
worker/config.py still reads its own way (a JSON file, flags, a mapping
setting) until it moves here too (docs/ARCHITECTURE.md, "Configuration
loaders").

Standard library only, and one file outside the three packages, so each
installs it without the others: the proxy and the scaler from this
distribution, the worker VM as a file beside worker/ (vm_provisioning/
template.py), where no pip runs.
"""
from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping


class SettingError(ValueError):
    """Raised when a setting is unknown or mistyped, or the config file cannot be read.

    Each package translates it into its own ConfigError at its load_config.
    """


def layered(cls, *, env: Mapping[str, str], prefix: str, config_file: str | None = None,
            section: str | None = None, overrides: dict | None = None,
            nullable: dict[str, type] | None = None) -> dict:
    """The settings of dataclass `cls` that some layer sets, coerced; not range-checked.

    Args:
        cls: the settings dataclass; its fields are the known settings and the
            type of each default is the type its values are coerced to.
        env: the environment; `prefix` + NAME in capitals sets the field `name`.
        prefix: the deployable's prefix, e.g. "JOBCLOUD_".
        config_file: a TOML file to read, or None.
        section: the file's table for this deployable; a file without that
            table is read at its top level.
        overrides: values that win over everything; a None value is not set
            (a command-line flag that was not given).
        nullable: fields whose default is None, with the type they take when
            set; an empty string sets them back to None.

    Returns:
        Field name -> value, for the fields some layer set.

    Raises:
        SettingError: an unknown setting, a value of the wrong type, or a
            config file that is missing, unreadable or not valid TOML.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    if config_file:
        values.update(read_toml(config_file, section, fields))
    for name in fields:
        if prefix + name.upper() in env:
            values[name] = env[prefix + name.upper()]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    nullable = nullable or {}
    out = {}
    for name, value in values.items():
        if name not in fields:
            raise SettingError(f"unknown setting {name!r}")
        if name in nullable:
            out[name] = None if value in ("", None) else coerce(name, value, nullable[name])
        else:
            out[name] = coerce(name, value, _kind(fields[name]))
    return out


def read_toml(path: str, section: str | None, known) -> dict:
    """The settings in a TOML file: its [section] table, or its top level.

    Raises:
        SettingError: the file cannot be read, is not TOML, or names a setting
            not in `known`.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SettingError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingError(f"config file {path} is not valid TOML: {e}") from None
    table = data.get(section, data) if section else data
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise SettingError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return dict(table)


def coerce(name: str, value, kind: type):
    """`value` (from a file, the environment or a flag) as a `kind`.

    Tuples come from a list or a comma-separated string; booleans from
    1/true/yes/on or 0/false/no/off (anything else is refused). A bool is not taken for a number, nor 2.5 for an integer:
    TOML and JSON would let both through silently.

    Raises:
        SettingError: the value is not a valid `kind`, naming the setting.
    """
    try:
        if kind is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
        if kind is bool:
            # A typo ("ture", "2") is refused, not read as false: a switch that
            # silently stays off is worse than a proxy that will not start.
            if isinstance(value, str):
                word = value.strip().lower()
                if word in ("1", "true", "yes", "on"):
                    return True
                if word in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SettingError(f"setting {name}: {value!r} is not a valid {kind.__name__}") from None


def _kind(field: dataclasses.Field) -> type:
    """The type a field's values take: its default's."""
    default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
               else field.default)
    if default is None:
        # A programming error, not a user's: the type cannot be read off None.
        raise TypeError(f"setting {field.name} defaults to None: name its type in `nullable`")
    return type(default)
