"""Registries of interchangeable parts (mixers, tasks, datasets): name -> module path.

Each registry is a plain dict in its package's __init__.py, one line per part, so a
newcomer adds a part by adding a module and a line. Modules are imported on first use:
a part costs nothing until it is asked for, and a registry never imports what sits
above it.
"""

import importlib


def registered_module(registry, kind, name):
    """The module registered as `name` in `registry`; ValueError naming the known names
    (`kind` names the argument: "mixer", "task", "dataset")."""
    if name not in registry:
        raise ValueError(f"{kind}: expected one of {tuple(registry)}, got {name!r}")
    return importlib.import_module(registry[name])
