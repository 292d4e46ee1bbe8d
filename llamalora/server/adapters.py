"""The server's adapters by name: what `--lora NAME=PATH` loads, /v1/models lists, `model: "NAME"` picks and
/lora-adapters/load and /unload change while the server runs.

Every adapter has an id that is never reused (llama.cpp's `lora` field and /lora-adapters refer to it), a
name, its path, the scale a request naming it runs it at, and a global scale (what requests that name
nothing use, set by POST /lora-adapters). A request's choice is resolved once, when it is checked, into the
adapter objects and scales it runs with (`LoraChoice`): unloading an adapter later never changes a request
already accepted.
"""

import os
import re
import threading
from dataclasses import dataclass

from ..errors import InputError
from .schemas import ApiError

NAME_PATTERN = re.compile(r"^[^\s/\\=]{1,128}$")
ADAPTER_SUFFIXES = (".gguf", ".bin", ".safetensors")


@dataclass
class AdapterEntry:
    id: int
    name: str
    path: str
    adapter: object  # LoraAdapter, loaded at user scale 1
    scale: float  # the scale when a request names it (model: NAME)
    global_scale: float  # the scale for requests that name nothing


@dataclass(frozen=True)
class LoraChoice:
    """The adapters a request runs with: key ((id, scale), ...) for the ones with a scale other than 0, and
    their adapter objects in the same order."""

    key: tuple = ()
    adapters: tuple = ()


def default_name(path: str) -> str:
    """An adapter named after its folder, or its file without the extension."""
    base = os.path.basename(os.path.normpath(path))
    for suffix in ADAPTER_SUFFIXES:
        if not os.path.isdir(path) and base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def split_named(value: str) -> tuple[str, str]:
    """--lora NAME=PATH, or a bare PATH named after itself (a path that exists is never split)."""
    if "=" in value and not os.path.exists(value):
        name, path = value.split("=", 1)
        if NAME_PATTERN.match(name) and path:
            return name, path
    return default_name(value), value


def check_names(names: list[str], base_name: str) -> None:
    for name in names:
        if not NAME_PATTERN.match(name):
            raise InputError(f"--lora: adapter name {name!r} must be 1 to 128 characters without spaces, '/' or '='")
        if names.count(name) > 1:
            raise InputError(f"--lora: two adapters are named {name!r}; name them apart with --lora NAME=PATH")
        if name == base_name:
            raise InputError(f"--lora: adapter name {name!r} is the base model's name (--alias)")


class AdapterRegistry:
    def __init__(self, entries: list[AdapterEntry], merged: bool):
        self.entries = list(entries)
        self.merged = merged  # merged into the weights: scales are fixed, nothing loads at run time
        self.next_id = max((e.id for e in entries), default=-1) + 1
        self.lock = threading.Lock()

    def ids(self) -> list[int]:
        return [e.id for e in self.entries]

    def by_name(self, name: str) -> AdapterEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    def listing(self) -> list:
        return [{"id": e.id, "name": e.name, "path": e.path, "scale": e.global_scale} for e in self.entries]

    def set_global_scales(self, scales: dict) -> None:
        """POST /lora-adapters: the whole list, as llama.cpp's; adapters not named get 0."""
        for e in self.entries:
            e.global_scale = scales.get(e.id, 0.0)

    def choose(self, model: str | None, lora: dict | None, base_name: str) -> LoraChoice:
        """A request's adapters: its own `lora` scales; else the adapter its `model` names at that adapter's
        scale, none for the base's name; else (no model, or a name nobody serves, which llama.cpp ignores
        too) the global scales."""
        if self.merged:
            if lora is not None:
                raise ApiError(400, "'lora': the adapters are merged into the weights (--lora-base or --lora-mode "
                                    "merge), so a request cannot change their scales")
            if model is not None and self.by_name(model) is not None:
                raise ApiError(400, f"'model': the adapter '{model}' is merged into the weights (--lora-base or "
                                    f"--lora-mode merge); it cannot be chosen by name")
            return LoraChoice()
        if lora is not None:
            scales = {e.id: lora.get(e.id, 0.0) for e in self.entries}
        elif model is not None and self.by_name(model) is not None:
            entry = self.by_name(model)
            scales = {entry.id: entry.scale}
        elif model is not None and model == base_name:
            scales = {}
        else:
            scales = {e.id: e.global_scale for e in self.entries}
        chosen = [(e, scales[e.id]) for e in self.entries if scales.get(e.id, 0.0) != 0.0]
        return LoraChoice(tuple((e.id, s) for e, s in chosen), tuple(e.adapter for e, _ in chosen))

    def add(self, name: str, path: str, adapter, scale: float) -> AdapterEntry:
        """A run-time adapter: global scale 0, so that only requests naming it (model or lora) run it."""
        with self.lock:
            if self.by_name(name) is not None:
                raise ApiError(400, f"an adapter named '{name}' is already loaded")
            entry = AdapterEntry(self.next_id, name, path, adapter, scale, 0.0)
            self.next_id += 1
            self.entries.append(entry)
            return entry

    def remove(self, name: str) -> AdapterEntry:
        with self.lock:
            entry = self.by_name(name)
            if entry is None:
                raise ApiError(404, f"no adapter named '{name}' is loaded", "not_found_error")
            self.entries.remove(entry)
            return entry


def check_new_name(name, base_name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ApiError(400, "'name' must be 1 to 128 characters without spaces, '/' or '='")
    if name == base_name:
        raise ApiError(400, f"'name': '{name}' is the base model's name")
    return name
