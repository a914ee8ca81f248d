"""The static policy file (``--auth-policy FILE``): who may do what, for small deployments
without a token server.

TOML (read with the standard library's tomllib), a list of rules::

    # Alice pushes and pulls her team's repositories, at any depth below team-a/.
    [[rule]]
    subjects = ["alice"]                 # token `sub` values
    repositories = ["team-a/**"]
    actions = ["pull", "push"]

    # The CI machine, by its client certificate (DNS or URI SAN, else CN).
    [[rule]]
    certificates = ["ci.example.internal"]
    repositories = ["*/releases"]
    actions = ["*"]                      # pull, push and delete

    # Everyone, tokenless callers included: pull what is public, one level down.
    [[rule]]
    anonymous = true
    repositories = ["public/*"]
    actions = ["pull"]

    # Every authenticated caller may list all repositories.
    [[rule]]
    authenticated = true
    catalog = true

A rule applies to a caller when one of its ``subjects`` is the token's subject, one of its
``certificates`` is an identity of the client certificate, ``authenticated = true`` and the
caller authenticated (a token or a client certificate), or ``anonymous = true`` (every caller).
It grants its ``actions`` (pull, push, delete, ``*`` for the three) on the repositories its
``repositories`` globs match, and the catalog (every repository in ListRepositories) with
``catalog = true``.

Globs match whole path segments: a name and a pattern are split at ``/``; ``**`` as a whole
segment matches any number of segments (none included), any other segment matches one segment
with fnmatch's ``*``, ``?`` and ``[...]`` (case-sensitive), which never cross a ``/``. So
``team-a/*`` matches ``team-a/app`` but neither ``team-a`` nor ``team-a/x/app``; ``team-a/**``
matches all three but ``team-a``'s siblings; ``**`` matches every repository.

Grants only add up: what a caller may do is the union of every rule that applies to it and of
its token's access claim. Unknown keys are an error (a typo must not silently grant or deny).
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.auth.tokens import ACTIONS

_RULE_KEYS = frozenset(
    {"subjects", "certificates", "anonymous", "authenticated", "repositories", "actions", "catalog"}
)


class PolicyError(Exception):
    """A policy file that cannot be used; the message names the file and the problem."""


def _segments_match(pattern: list[str], name: list[str]) -> bool:
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_segments_match(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _segments_match(rest, name[1:])


def glob_match(pattern: str, repository: str) -> bool:
    """Whether ``repository`` matches ``pattern`` segment by segment (see the module doc)."""
    return _segments_match(pattern.split("/"), repository.split("/"))


@dataclass(frozen=True)
class Rule:
    subjects: frozenset[str] = frozenset()
    certificates: frozenset[str] = frozenset()
    anonymous: bool = False
    authenticated: bool = False
    repositories: tuple[str, ...] = ()
    actions: frozenset[str] = frozenset()
    catalog: bool = False

    def applies(
        self, subject: str | None, certificates: Iterable[str], authenticated: bool
    ) -> bool:
        return (
            self.anonymous
            or (self.authenticated and authenticated)
            or (subject is not None and subject in self.subjects)
            or any(c in self.certificates for c in certificates)
        )

    def everywhere(self) -> bool:
        return "**" in self.repositories


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()

    def applicable(
        self, subject: str | None, certificates: Iterable[str], authenticated: bool
    ) -> tuple[Rule, ...]:
        identities = tuple(certificates)
        return tuple(r for r in self.rules if r.applies(subject, identities, authenticated))


def _strings(value: object, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: {key} must be a list of non-empty strings")
    return tuple(value)


def _rule(entry: object, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: a rule must be a table")
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    for flag in ("anonymous", "authenticated", "catalog"):
        if not isinstance(entry.get(flag, False), bool):
            raise PolicyError(f"{where}: {flag} must be true or false")
    actions = set(_strings(entry.get("actions", []), where, "actions"))
    if actions - ACTIONS - {"*"}:
        bad = sorted(actions - ACTIONS - {"*"})[0]
        raise PolicyError(f"{where}: unknown action {bad!r} (pull, push, delete or *)")
    repositories = _strings(entry.get("repositories", []), where, "repositories")
    rule = Rule(
        subjects=frozenset(_strings(entry.get("subjects", []), where, "subjects")),
        certificates=frozenset(_strings(entry.get("certificates", []), where, "certificates")),
        anonymous=entry.get("anonymous", False),
        authenticated=entry.get("authenticated", False),
        repositories=repositories,
        actions=ACTIONS if "*" in actions else frozenset(actions),
        catalog=entry.get("catalog", False),
    )
    if not (rule.subjects or rule.certificates or rule.anonymous or rule.authenticated):
        raise PolicyError(
            f"{where}: names nobody (subjects, certificates, authenticated or anonymous)"
        )
    if bool(rule.repositories) != bool(rule.actions):
        raise PolicyError(f"{where}: repositories and actions go together")
    if not (rule.actions or rule.catalog):
        raise PolicyError(f"{where}: grants nothing (actions or catalog)")
    return rule


def parse_policy(text: str, source: str = "policy") -> Policy:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(document) - {"rule"}
    if unknown:
        raise PolicyError(f"{source}: unknown key {sorted(unknown)[0]!r} (only [[rule]] tables)")
    entries = document.get("rule", [])
    if not isinstance(entries, list):
        raise PolicyError(f"{source}: rule must be an array of tables ([[rule]])")
    return Policy(tuple(_rule(e, f"{source}: rule {i + 1}") for i, e in enumerate(entries)))


def load_policy(path: str) -> Policy:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_policy(text, path)
