"""The admin state file: operator changes made through the API, kept across reloads and restarts.

Like HAProxy's server-state file, it is re-applied on top of the configuration. It is an input like
the configuration file, so it is validated with the same rules (``validate_analyzer`` and friends);
a bad file is a ``ConfigError`` naming the path and the field, never a traceback or a half-read state.

It is written atomically and durably: a temporary file in the same directory (whose name can never be
the target's), fsync, ``os.replace``, fsync of the directory. A failure raises ``OSError`` so the caller
can refuse the change instead of applying something it could not save.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from distributor.config import (
    MAX_ANALYZERS,
    AnalyzerConfig,
    AnalyzerRules,
    ConfigError,
    check_name,
    check_weight,
    parse_analyzer,
    read_regular_file,
)

KEYS = ("weights", "drained", "added", "removed")


@dataclass(slots=True)
class AdminState:
    """What the admin API changed. To apply a change only once it is saved: record it on a copy
    (``copy.deepcopy``), ``save_state`` the copy, then adopt it.

    Invariant kept by the ``record_*`` methods: a name in ``removed`` is nowhere else (a removal wins over
    the configuration and over an earlier API add, until the API adds that name again). ``weights``
    overrides the weight of any analyzer, configured or added.
    """

    weights: dict[str, float] = field(default_factory=dict)
    drained: set[str] = field(default_factory=set)
    added: list[AnalyzerConfig] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)

    def record_add(self, analyzer: AnalyzerConfig) -> None:
        """A new analyzer (replacing an earlier add of that name), with none of that name's old changes."""
        self._forget(analyzer.name)
        self.added.append(analyzer)

    def record_remove(self, name: str) -> None:
        """Gone for good, whether it came from the configuration or from an API add."""
        self._forget(name)
        self.removed.add(name)

    def record_weight(self, name: str, weight: float) -> None:
        """Of a present analyzer (so never a removed name): kept apart from ``added`` so it also overrides
        the configuration's weight."""
        self.weights[name] = weight

    def record_drain(self, name: str, drained: bool) -> None:
        """Of a present analyzer; a drain survives reloads and restarts like any other change."""
        if drained:
            self.drained.add(name)
        else:
            self.drained.discard(name)

    def _forget(self, name: str) -> None:
        self.weights.pop(name, None)
        self.drained.discard(name)
        self.added = [a for a in self.added if a.name != name]
        self.removed.discard(name)

    def apply(self, analyzers: Sequence[AnalyzerConfig]) -> dict[str, AnalyzerConfig]:
        """The configured analyzers with these changes on top: removals, adds (the configuration's
        definition of a name wins), weights; no more than the shared table holds."""
        definitions = {a.name: a for a in analyzers if a.name not in self.removed}
        for analyzer in self.added:
            definitions.setdefault(analyzer.name, analyzer)
        for name, weight in self.weights.items():
            if name in definitions:
                definitions[name] = dataclasses.replace(definitions[name], weight=weight)
        if not definitions:
            raise ConfigError("admin.state_file: removes every analyzer")
        if len(definitions) > MAX_ANALYZERS:
            raise ConfigError(f"admin.state_file: its added analyzers make {len(definitions)}, "
                              f"at most {MAX_ANALYZERS} allowed")
        return definitions

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": dict(sorted(self.weights.items())),
            "drained": sorted(self.drained),
            "added": [dataclasses.asdict(a) for a in self.added],
            "removed": sorted(self.removed),
        }


def load_state(path: str, rules: AnalyzerRules) -> AdminState:
    """The saved state (empty without a path or file), validated like the configuration.

    ``rules`` is ``config.analyzer_rules`` of the configuration being installed: a state file's analyzer
    must pass what the same analyzer in the configuration file must pass.
    """
    if not path:
        return AdminState()
    if not os.path.lexists(path):
        return AdminState()
    raw = read_regular_file(path, "admin.state_file")
    try:
        data = json.loads(raw.decode())
        return _parse(data, rules)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"admin.state_file: {path}: not UTF-8 at byte offset {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"admin.state_file: {path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"admin.state_file: {path}: nests too deeply") from None
    except ConfigError as exc:
        raise ConfigError(f"admin.state_file: {path}: {exc}") from None


def _parse(data: object, rules: AnalyzerRules) -> AdminState:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object with the keys {', '.join(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}")
    weights = data.get("weights", {})
    if not isinstance(weights, dict):
        raise ConfigError("weights: expected an object of name: weight")
    added = data.get("added", [])
    if not isinstance(added, list):
        raise ConfigError("added: expected a list of analyzers")
    state = AdminState(
        weights={check_name("weights", name): check_weight(f"weights.{name}", w) for name, w in weights.items()},
        drained=_names("drained", data.get("drained", [])),
        added=[parse_analyzer(f"added[{i}]", entry, rules) for i, entry in enumerate(added)],
    )
    names = [a.name for a in state.added]
    if len(set(names)) != len(names):
        raise ConfigError(f"added: {max(names, key=names.count)!r} twice")
    # files written before removals cleaned up the other keys may hold a removed name elsewhere too
    for name in sorted(_names("removed", data.get("removed", []))):
        state.record_remove(name)
    return state


def _names(where: str, value: object) -> set[str]:
    """A list of analyzer names; never a string, which would match names by substring."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of analyzer names, got {type(value).__name__}")
    return {check_name(f"{where}[{i}]", name) for i, name in enumerate(value)}


def _temporary(path: str) -> str:
    """Same directory (so os.replace is atomic), hidden, and longer than the target's name: never equal."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.tmp")


def save_state(path: str, state: AdminState) -> None:
    """Replace the file atomically and durably; OSError if that is not possible.

    Before ``os.replace`` a failure leaves the old file as it was (and no temporary file); after it, only
    the directory's fsync can fail (EIO), and then the new content is in place but maybe not durable.
    """
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as fh:
            fh.write(json.dumps(state.to_json(), indent=2).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory = os.open(os.path.dirname(temporary), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def check_writable(path: str) -> None:
    """At start (and when a reload changes the path): can changes be saved there? By trying, since
    permissions alone do not tell (root, read-only mounts, ACLs). Without a path there is nothing to save."""
    if not path:
        return
    if os.path.isdir(path):
        raise ConfigError(f"admin.state_file: {path} is a directory")
    temporary = _temporary(path)
    try:
        with open(temporary, "wb"):
            pass
        os.unlink(temporary)
    except OSError as exc:
        raise ConfigError(f"admin.state_file: cannot write in the directory of {path}: {exc.strerror}") from None
