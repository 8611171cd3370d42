"""Make the plain `lm_eval` command see the `homellm` model type.

lm-eval 0.4.13 finds a model type only in its own registry, which its own modules fill on
import; it has no plugin hook (no entry points, no option that imports a module before
`--model` is looked up). So `homellm eval tasks --install-plugin` writes one line into a .pth
file in this environment's site-packages (Python runs such lines at start-up, as coverage's and
setuptools' own .pth files do):

    import importlib.util as u; u.find_spec("homellm") and __import__(...).watch()

`watch()` costs a few microseconds and imports nothing heavy: it puts a finder on sys.meta_path
that waits for `lm_eval.api.registry` to be imported and then registers "homellm" there by
name (a lazy "module:class" entry, as lm-eval registers its own back ends), so homellm's
harness is imported only when `--model homellm` is asked for. `--remove-plugin` deletes the
file. `homellm eval tasks` itself needs none of this (it hands lm-eval the model object).
"""
from __future__ import annotations

import sys  # (the rest is imported where used: this module loads at every start-up)

PTH_NAME = "homellm-lm-eval.pth"  # sorts after __editable__*.pth, which makes homellm importable
# (a no-op once homellm is uninstalled and the file is left behind)
PTH_LINE = ('import importlib.util as u; u.find_spec("homellm") and '
            '__import__("homellm.eval.lm_eval_plugin", fromlist=["watch"]).watch()\n')
TARGET = "homellm.eval.harness:HomellmLM"
REGISTRY = "lm_eval.api.registry"


def register(registry_module) -> None:
    """Register "homellm" (lazily) in an imported lm_eval.api.registry."""
    registry = registry_module.model_registry
    if "homellm" in registry:
        return
    # lm-eval fills the registry with its own back ends only while it is empty: fill it first
    import lm_eval.models  # noqa: F401
    registry.register("homellm", target=TARGET)


class _Loader:
    """The registry's own loader, and then `register`."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        register(module)

    def __getattr__(self, name):  # get_source, get_code, ... (tracebacks, inspect)
        return getattr(self.inner, name)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY:
            return None
        import importlib.util
        sys.meta_path.remove(self)  # one registry per process; the real finders find it
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def watch() -> None:
    """Register homellm in lm-eval's model registry once it is imported (now, if it is)."""
    if REGISTRY in sys.modules:
        register(sys.modules[REGISTRY])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def site_dir():
    """This interpreter's site-packages (where pip put lm_eval and homellm)."""
    import sysconfig
    from pathlib import Path
    return Path(sysconfig.get_paths()["purelib"])


def install_pth():
    """Write the .pth file; returns its path."""
    import os
    import tempfile

    from homellm.errors import HomellmError
    path = site_dir() / PTH_NAME
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-homellm-")
        with os.fdopen(fd, "w") as f:
            f.write(PTH_LINE)
        os.replace(tmp, path)
    except OSError as e:
        raise HomellmError(f"cannot write {path}: {e.strerror or e} (install into an environment "
                           f"you can write to, e.g. a virtualenv)") from None
    return path


def remove_pth():
    """Delete the .pth file; returns its path, or None when there was none."""
    from homellm.errors import HomellmError
    path = site_dir() / PTH_NAME
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HomellmError(f"cannot remove {path}: {e.strerror or e}") from None
    return path
