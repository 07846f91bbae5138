"""Named registries of components, so configs and the CLI refer to them by string.

A component is registered with a factory (a class or a function). Its keyword arguments with
defaults are the options a config section may set; `build` checks the names and types of those
options so that a typo in a TOML file is a one-line error rather than a silent default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from koinon.errors import ConfigError

T = TypeVar("T")


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """A family of components (codecs, aggregators, ...) keyed by name."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, tuple[Callable[..., T], str]] = {}

    def register(
        self, name: str, description: str | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._entries[name] = (factory, description or _first_line(factory))
            return factory

        return decorate

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        return [(n, self._entries[n][1]) for n in self.names()]

    def get(self, name: str, key: str | None = None) -> Callable[..., T]:
        if name not in self._entries:
            where = f"{key} = {name!r}" if key else f"{self.family} {name!r}"
            raise ConfigError(
                f"{where}: unknown {self.family}; allowed: {', '.join(self.names())}"
            )
        return self._entries[name][0]

    def options(self, name: str) -> dict[str, Any]:
        """Keyword options of a component with their defaults (what a config may set)."""
        factory = self.get(name)
        return _keyword_options(factory)

    def resolve(self, name: str, options: dict[str, Any], context: tuple[str, ...] = ()) -> dict[str, Any]:
        """`options` with every option of `name` left unset filled in with its default: what a
        resolved config records, so that it reproduces the run even if a default changes.

        Left out: the `context` keys the framework passes (or derives) and options whose default
        is None (the component decides, or the option is required). Tuples become lists, as
        TOML reads them back, so resolving a resolved dict returns an equal one."""
        defaults = {k: v for k, v in _keyword_options(self.get(name)).items()
                    if v is not None and k not in context}
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in {**defaults, **options}.items()}

    def build(self, name: str, options: dict[str, Any], section: str, **context: Any) -> T:
        """Construct `name` with user `options` (checked) plus framework `context` arguments."""
        factory = self.get(name, key=f"{section}.name")
        allowed = _keyword_options(factory)
        for key, value in options.items():
            if key not in allowed or key in context:
                allowed_user = sorted(k for k in allowed if k not in context)
                raise ConfigError(
                    f"{section}.{key}: not an option of {self.family} {name!r}; "
                    f"allowed: {', '.join(allowed_user) or '(none)'}"
                )
            default = allowed[key]
            if default is not None and not _same_kind(default, value):
                raise ConfigError(
                    f"{section}.{key} = {value!r}: expected {type(default).__name__} "
                    f"for {self.family} {name!r}"
                )
        accepted = {k: v for k, v in context.items() if k in allowed or _takes_kwargs(factory)}
        try:
            return factory(**accepted, **options)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{section} ({self.family} {name!r}): {exc}") from None


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _takes_kwargs(factory: Callable[..., Any]) -> bool:
    params = inspect.signature(factory).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _keyword_options(factory: Callable[..., Any]) -> dict[str, Any]:
    sig = inspect.signature(factory)
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
