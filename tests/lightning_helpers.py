"""Stand-ins for the classes official Lightning checkpoints pickle, so test checkpoints name them alike."""

from __future__ import annotations

import sys
import types


def fake_lightning_class(qualified: str, base: type = object) -> type:
    """A class importable under Lightning's module path, so pickles name it like real checkpoints do."""
    module, _, name = qualified.rpartition(".")
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (base,), {"__module__": module})
    setattr(sys.modules[module], name, cls)
    return cls
