"""Reading and writing ``config.yaml`` text, and the messages of invalid values.

``read_yaml`` parses a file with PyYAML's safe loader, ``prepare`` expands
variables, drops ``IGNORED_KEYS`` and converts bare-path directories, and
``ErrorMessages`` turns pydantic errors into messages that name the key path,
the value, what is allowed and an example. ``render_yaml`` writes the
effective configuration. ``tvm_upload.config`` ties these to its models.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from tvm_upload.configvalues import (
    FROM_INPUT,
    MISSING,
    TIME_OF_DAY,
    Problem,
    Sexagesimal,
    expand_user,
    format_time,
)
from tvm_upload.errors import ConfigError

logger = logging.getLogger(__name__)

Location = tuple[str | int, ...]

IGNORED_KEYS: dict[tuple[str, ...], str] = {
    ("disk", "cleanup_threshold"): (
        "an early name the older uploader never read; disk.warning_threshold sets "
        "where cleanup of uploaded files starts"
    ),
    ("deletion", "emergency", "threshold"): (
        "the older uploader never read it; disk.warning_threshold and "
        "disk.critical_threshold set when emergency cleanup runs"
    ),
    ("monitoring", "local_log_path"): (
        "logs go to stderr, where journald stores them (journalctl -u tvm-upload)"
    ),
    ("retry",): (
        "the older uploader never read this section; upload.max_attempts and "
        "upload.retry set per-file attempts and backoff"
    ),
    ("upload", "processed_files_registry", "enabled"): (
        "the registry is part of the state store and is always on"
    ),
}
"""Keys of older config files that are accepted, logged at WARNING and ignored."""

_VARIABLE = re.compile(
    r"\$(?:(?P<escape>\$)|\{(?P<braced>[^}]*)(?P<close>\}?)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# Reading YAML.


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that keeps the text of sexagesimal ints and notes duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.warnings: list[str] = []


def _construct_int(loader: _ConfigLoader, node: yaml.ScalarNode) -> int:
    number = loader.construct_yaml_int(node)
    if ":" in str(node.value):
        return Sexagesimal(number, str(node.value))
    return number


def _construct_mapping(loader: _ConfigLoader, node: yaml.MappingNode) -> Any:
    _note_duplicate_keys(loader, node)
    data: dict[Any, Any] = {}
    yield data
    data.update(loader.construct_mapping(node))


def _note_duplicate_keys(loader: _ConfigLoader, node: yaml.MappingNode) -> None:
    first_line: dict[str, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in first_line:
            loader.warnings.append(
                f'duplicate key "{key_node.value}" at line {line} (first at line '
                f"{first_line[key_node.value]}): the later value is used"
            )
        else:
            first_line[key_node.value] = line


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; raise ``ConfigError`` when it cannot be read or parsed.

    Duplicate keys are logged at WARNING (the later value is used, as PyYAML does).
    """
    text = _read_text(path)
    loader = _ConfigLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError([_yaml_problem(error)], str(path)) from None
    except RecursionError:
        nesting = "the YAML document is nested too deeply to be a configuration"
        raise ConfigError([nesting], str(path)) from None
    finally:
        loader.dispose()

    for warning in loader.warnings:
        logger.warning("%s: %s", path, warning)

    expansion = _expansion_problem(data)
    if expansion:
        raise ConfigError([expansion], str(path))
    return data


MAX_EXPANDED_VALUES = 100_000
"""Most values a config may hold once YAML aliases are expanded; real configs hold hundreds."""


def _expansion_problem(data: Any) -> str | None:
    """Return why ``data`` cannot be a config (alias cycle, alias bomb, nesting), or None.

    Aliases share one Python object, so the count is memoised by object
    identity and stays cheap even for a billion-laughs document, whose
    expanded size it still computes exactly.
    """
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def expanded_size(value: Any) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise ValueError("a YAML alias refers to a value that contains it")
        in_progress.add(key)
        children = value.values() if isinstance(value, dict) else value
        size = 1 + sum(expanded_size(child) for child in children)
        in_progress.discard(key)
        sizes[key] = size
        return size

    try:
        total = expanded_size(data)
    except ValueError as error:
        return f"the YAML document is not a configuration: {error}; remove the alias"
    except RecursionError:
        return "the YAML document is nested too deeply to be a configuration"
    if total > MAX_EXPANDED_VALUES:
        return (
            f"the YAML document expands to {total} values through aliases (at most"
            f" {MAX_EXPANDED_VALUES} are allowed); remove the anchors and aliases"
        )
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problem = (
            "configuration file not found. Create it from config/config.yaml.example, "
            "for example at /etc/tvm-upload/config.yaml"
        )
    except PermissionError:
        problem = "permission denied when reading the file; make it readable by the service user"
    except IsADirectoryError:
        problem = "is a directory; give the path of the YAML file"
    except UnicodeDecodeError as error:
        problem = f"is not UTF-8 text (invalid byte at offset {error.start}); save it as UTF-8"
    except OSError as error:
        problem = f"cannot be read: {error.strerror}"
    raise ConfigError([problem], str(path))


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    if not isinstance(error, yaml.MarkedYAMLError) or mark is None:
        return f"YAML syntax error: {error}"
    context = f" ({error.context})" if error.context else ""
    return (
        f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: "
        f"{error.problem}{context}. Check the indentation and quoting on that line "
        f'and the one before it, for example "key: value" with a space after the colon'
    )


def top_level_problem(data: Any) -> str:
    """Return the message for parsed data that is not a mapping."""
    if data is None:
        return (
            "the configuration is empty. Allowed: a mapping with at least vehicle_id, "
            "log_directories and s3. Example: vehicle_id: vehicle-CN-001"
        )
    return (
        f"the top level is a {type(data).__name__}, but it must be a mapping of keys. "
        "Example: vehicle_id: vehicle-CN-001"
    )


# Preparing parsed data for validation.


@dataclasses.dataclass
class Prepared:
    """Parsed data ready for the models, with what was found on the way."""

    data: dict[Any, Any]
    problems: list[Problem]
    notices: list[str]


def prepare(data: Mapping[Any, Any], environ: Mapping[str, str]) -> Prepared:
    """Copy ``data`` with variables expanded, ``IGNORED_KEYS`` dropped and bare paths converted.

    An undefined variable becomes a ``Problem`` located at its key; the text is
    kept unexpanded. Each ignored key and legacy form adds a notice to log.
    """
    prepared = Prepared({}, [], [])
    prepared.data = _prepare_value(data, (), environ, prepared)
    _convert_legacy_directories(prepared, environ)
    return prepared


def _prepare_value(
    value: Any, loc: Location, environ: Mapping[str, str], prepared: Prepared
) -> Any:
    if isinstance(value, Mapping):
        copy = {}
        for key, item in value.items():
            child = (*loc, key)
            if child in IGNORED_KEYS:
                prepared.notices.append(f"{key_path(child)} is ignored: {IGNORED_KEYS[child]}")
                continue
            copy[key] = _prepare_value(item, child, environ, prepared)
        return copy

    if isinstance(value, list):
        return [
            _prepare_value(item, (*loc, index), environ, prepared)
            for index, item in enumerate(value)
        ]
    if isinstance(value, str):
        return _expand_variables(value, loc, environ, prepared.problems)
    return value


def _expand_variables(
    text: str, loc: Location, environ: Mapping[str, str], problems: list[Problem]
) -> str:
    """Replace ``${VAR}`` and ``$VAR``; an undefined or malformed one becomes a problem."""
    failures: list[str] = []

    def replace(match: re.Match[str]) -> str:
        if match.group("escape"):
            return "$"
        name = match.group("braced") if match.group("bare") is None else match.group("bare")
        if match.group("bare") is None and not match.group("close"):
            failures.append('has "${" without a closing "}"')
        elif not _VARIABLE_NAME.fullmatch(name):
            failures.append(f'has "${{{name}}}", which is not a variable name')
        elif name not in environ:
            failures.append(
                f"uses ${{{name}}}, but {name} is not set in the environment; set it for the "
                f"service (systemd: Environment={name}=...) or write $$ for a literal $"
            )
        else:
            return environ[name]
        return match.group(0)

    expanded = _VARIABLE.sub(replace, text)
    problems.extend(Problem(reason, at=loc, value=text) for reason in failures)
    return expanded


def _convert_legacy_directories(prepared: Prepared, environ: Mapping[str, str]) -> None:
    """Turn each bare path in ``log_directories`` into a mapping with a guessed source.

    The guess is the source the older uploader used for that path, so object
    key prefixes stay the same. Guesses that collide with another directory's
    source fall back to the last path component, because sources must be unique.
    """
    directories = prepared.data.get("log_directories")
    if not isinstance(directories, list):
        return

    bare = {i: entry for i, entry in enumerate(directories) if isinstance(entry, str)}
    guesses = {i: _older_uploader_source(entry, environ) for i, entry in bare.items()}
    taken = [d.get("source") for d in directories if isinstance(d, Mapping)]
    taken += list(guesses.values())

    for index, entry in bare.items():
        source = guesses[index]
        if taken.count(source) > 1:
            source = _last_component_source(entry, environ)
        directories[index] = {"path": entry, "source": source} if source else {"path": entry}
        prepared.notices.append(
            f'log_directories[{index}] is a bare path, a deprecated form; using source "{source}". '
            f'Write it as "- path: {entry}" with "source: {source or "name"}" to choose the source'
        )


def _older_uploader_source(path_text: str, environ: Mapping[str, str]) -> str:
    """Return the source the older uploader derived from a bare path.

    It looked for terminal, ROS and ROS 2 log paths, then /var/log, then used
    the last component; that last case is sanitised here.
    """
    path = _expand_home(path_text, environ).lower()
    if "terminal" in path:
        return "terminal"
    if ".ros/log" in path or "ros_log" in path:
        return "ros"
    if "ros2" in path:
        return "ros2"
    if path.startswith("/var/log"):
        return "syslog"
    return _last_component_source(path_text, environ)


def _last_component_source(path_text: str, environ: Mapping[str, str]) -> str:
    """Return the last path component with characters other than ``[A-Za-z0-9_]`` as ``_``."""
    name = PurePosixPath(_expand_home(path_text, environ)).name
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def _expand_home(path_text: str, environ: Mapping[str, str]) -> str:
    try:
        return expand_user(path_text.strip(), environ)
    except PydanticCustomError:
        return path_text


# Writing YAML.


class _EffectiveDumper(yaml.SafeDumper):
    """Write whole floats such as ``60.0`` as ``60`` and times of day in quotes."""


def _represent_float(dumper: yaml.SafeDumper, value: float) -> yaml.Node:
    if value.is_integer():
        return dumper.represent_int(int(value))
    return dumper.represent_float(value)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if TIME_OF_DAY.fullmatch(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_EffectiveDumper.add_representer(float, _represent_float)
_EffectiveDumper.add_representer(str, _represent_str)


def render_yaml(data: dict[str, Any]) -> str:
    """Write JSON-like data as block YAML, with ``$`` doubled so that loading gives it back."""
    return yaml.dump(
        _escape_dollars(data), Dumper=_EffectiveDumper, sort_keys=False, allow_unicode=True
    )


def _escape_dollars(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {key: _escape_dollars(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_dollars(item) for item in value]
    return value


# Error messages.

_TYPE_REASONS = {
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "dict_type": "must be a mapping of keys",
    "list_type": "must be a list",
    "string_type": "must be a text string (quote it)",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
}


class ErrorMessages:
    """Writer of messages for the keys of ``root``, the model of the whole file.

    Each message reads ``key.path: invalid value V: reason. Allowed: A. Example:
    key: E``, where A and E are the ``description`` and first ``examples`` entry
    of the field.
    """

    def __init__(self, root: type[BaseModel]) -> None:
        self.root = root

    def of_validation(self, error: ValidationError, skip: list[Location]) -> list[str]:
        """Return one message per problem, dropping errors at or under a key in ``skip``."""
        messages: list[str] = []
        for details in error.errors():
            if any(tuple(details["loc"][: len(at)]) == at for at in skip):
                continue
            for message in self._messages(details):
                if message not in messages:
                    messages.append(message)
        return messages

    def of_problem(self, problem: Problem) -> str:
        """Return the message of a problem located from the top level."""
        return self.describe(problem.at, problem.value, problem.reason, problem.example)

    def _messages(self, details: ErrorDetails) -> list[str]:
        loc = tuple(details["loc"])
        if details["type"] == "config_problems":
            problems: list[Problem] = (details.get("ctx") or {})["problems"]
            return [self._describe_problem(loc, problem, details["input"]) for problem in problems]
        if details["type"] == "extra_forbidden":
            return [self._unknown_key(loc, details["input"])]
        if details["type"] == "invalid_key":
            return [_non_text_key(loc[:-1], details["input"])]
        if details["type"] == "missing":
            return [self.describe(loc, MISSING, "required")]
        return [self.describe(loc, details["input"], _reason(details))]

    def _describe_problem(self, loc: Location, problem: Problem, input_value: Any) -> str:
        value = input_value if problem.value is FROM_INPUT else problem.value
        return self.describe((*loc, *problem.at), value, problem.reason, problem.example)

    def describe(self, loc: Location, value: Any, reason: str, example: str | None = None) -> str:
        """Compose one message: key path, value, reason, what is allowed and an example."""
        info = self._field_info(loc)
        if value is MISSING:
            text = f"{key_path(loc)}: missing, but {reason}."
        else:
            text = f"{key_path(loc)}: invalid value {_show(value)}: {reason}."

        if info is not None and info.description:
            text += f" Allowed: {info.description}."
        if example is None and info is not None and info.examples:
            example = str(info.examples[0])
        if example is not None:
            text += f" Example: {_leaf(loc)}: {example}"
        return text

    def _unknown_key(self, loc: Location, value: Any) -> str:
        parent = loc[:-1]
        known = self._known_keys(parent)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        text = f"{key_path(loc)}: unknown key (value {_show(value)})"
        allowed = f"Allowed keys in {key_path(parent) or 'the top level'}: {', '.join(known)}."
        if not close:
            return f"{text}; check its spelling or remove it. {allowed}"

        info = self._field_info((*parent, close[0]))
        example = f" Example: {close[0]}: {info.examples[0]}" if info and info.examples else ""
        return f'{text}; did you mean "{close[0]}"? {allowed}{example}'

    def _field_info(self, loc: Location) -> FieldInfo | None:
        names = [part for part in loc if isinstance(part, str)]
        if not names:
            return None
        model = self._model_at(names[:-1])
        return _find_field(model, names[-1]) if model is not None else None

    def _known_keys(self, loc: Location) -> list[str]:
        model = self._model_at([part for part in loc if isinstance(part, str)])
        if model is None:
            return []
        return [
            info.validation_alias if isinstance(info.validation_alias, str) else name
            for name, info in model.model_fields.items()
        ]

    def _model_at(self, names: list[str]) -> type[BaseModel] | None:
        model: type[BaseModel] | None = self.root
        for name in names:
            info = _find_field(model, name) if model is not None else None
            if info is None:
                return None
            model = _nested_model(info.annotation)
        return model


def key_path(loc: Location) -> str:
    """Write a location as ``log_directories[0].path``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _non_text_key(parent: Location, key: Any) -> str:
    """Explain a key that YAML read as a number or boolean, such as an unquoted ``on``."""
    where = key_path(parent) or "the top level"
    return (
        f"{where}: invalid key {_show(key)}: YAML read it as a {type(key).__name__}, but keys "
        "must be text (YAML 1.1 reads unquoted yes, no, on and off as booleans). "
        'Quote it or fix its spelling. Example: "on": ...'
    )


def _reason(details: ErrorDetails) -> str:
    if details["type"] in _TYPE_REASONS:
        return _TYPE_REASONS[details["type"]]
    message = details["msg"]
    for subject in ("Input should", "List should", "String should", "Value should"):
        message = message.replace(subject, "must")
    return message.replace(" after validation", "")


def _show(value: Any) -> str:
    if isinstance(value, Sexagesimal):
        return str(int(value))
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dt.time):
        return f'"{format_time(value)}"'
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _leaf(loc: Location) -> str:
    names = [part for part in loc if isinstance(part, str)]
    return names[-1] if names else "value"


def _find_field(model: type[BaseModel], name: str) -> FieldInfo | None:
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.validation_alias):
            return info
    return None


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        model = _nested_model(argument)
        if model is not None:
            return model
    return None
