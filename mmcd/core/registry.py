"""One small registry for every extension point of the core.

A :class:`Registry` holds the objects of one kind (PTQ methods, QAT methods,
regularizers, architecture specs, range searches, quantizers, quantized
twins of modules), each registered once under a key and found from one
place:

* by **name** (a string key): ``REGISTRY.get('repq-vit')``; an unknown name
  fails listing the registered ones;
* by **type** (a class key): ``REGISTRY.find(module)`` walks the module's
  class hierarchy (most derived first) and returns what is registered for
  the first class that has an entry, so a subclass of ``nn.Linear`` gets
  the Linear handler unless it registers its own.

Registering a key twice is an error (a later registration would silently
replace a built-in one); :meth:`Registry.unregister` removes an entry (tests,
interactive use). It plays the role of mmengine's ``Registry`` for objects
that are not built from config dicts, and keeps the core free of OpenMMLab
imports. Pure Python.
"""
from typing import Any, Callable, Dict, Iterator, Optional, Union

Key = Union[str, type]


class Registry:
    """Objects of one ``kind`` (used in messages), keyed by name or type.

    ``register(obj)`` keys ``obj`` by ``key_of(obj)`` unless ``name`` is
    given (default ``key_of``: ``obj.name`` for methods and specs, else
    ``obj.__name__``); it returns ``obj``, so it also works as a decorator
    (``@REGISTRY.register`` or ``@REGISTRY.register(name='...')``).
    """

    def __init__(self, kind: str,
                 key_of: Optional[Callable[[Any], Optional[Key]]] = None):
        self.kind = kind
        self._key_of = key_of or _name_of
        self._entries: Dict[Key, Any] = {}

    def register(self, obj: Any = None, *, name: Optional[Key] = None):
        if obj is None:  # @register(name=...)
            return lambda target: self.register(target, name=name)
        key = name if name is not None else self._key_of(obj)
        if not key:
            raise ValueError(f'{self.kind}: {obj!r} has no name; give one '
                             'with register(obj, name=...)')
        if key in self._entries:
            raise ValueError(f'{self.kind} {_describe(key)} is registered '
                             f'already ({self._entries[key]!r})')
        self._entries[key] = obj
        return obj

    def unregister(self, key: Key) -> Any:
        return self._entries.pop(key)

    def get(self, key: Key) -> Any:
        """The entry of ``key``; an unknown key raises ``ValueError`` naming
        the registered ones (sorted)."""
        if key not in self._entries:
            raise ValueError(f'unknown {self.kind} {_describe(key)}; '
                             f'registered: {", ".join(sorted(self.names()))}')
        return self._entries[key]

    def find(self, obj: Any) -> Optional[Any]:
        """The entry of the first class of ``type(obj).__mro__`` that is
        registered, or None."""
        for cls in type(obj).__mro__:
            if cls in self._entries:
                return self._entries[cls]
        return None

    def names(self) -> list:
        """The keys, as text (class keys by their class name)."""
        return [_describe(key, quote=False) for key in self._entries]

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f'Registry({self.kind!r}: {", ".join(self.names())})'


def _name_of(obj: Any) -> Optional[str]:
    return getattr(obj, 'name', None) or getattr(obj, '__name__', None)


def _describe(key: Key, quote: bool = True) -> str:
    if isinstance(key, type):
        return key.__name__
    return repr(key) if quote else str(key)
