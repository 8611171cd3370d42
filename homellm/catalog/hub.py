"""Models from the Hugging Face hub: `hf:owner/repo[@revision][:file]`.

Needs the optional extra `hub` (huggingface_hub). Files go straight into the staging folder
(`local_dir`), not into the hub's blob cache. HF_ENDPOINT and HF_TOKEN are honoured, read
when the pull runs.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from urllib.parse import urlparse
from pathlib import Path

from homellm.errors import HomellmError, ModelFileError

_SPEC = re.compile(r"hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<rev>[\w./-]+?))?(:(?P<file>.+))?")


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """'hf:owner/repo@rev:file' -> (repo, revision or None, file or None)."""
    m = _SPEC.fullmatch(spec)
    if not m:
        raise HomellmError(f"{spec!r} is not a hub source: expected hf:owner/repo, "
                           "hf:owner/repo:file.gguf or hf:owner/repo@revision")
    return m["repo"], m["rev"], m["file"]


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HomellmError("pulling from the Hugging Face hub needs the optional extra `hub`: "
                           "pip install 'homellm[hub]' (or pull a local .gguf file or folder)") from None
    return huggingface_hub


def _network_errors(hub) -> tuple[type[BaseException], ...]:
    """The exception types a failed request raises (the hub's HTTP library varies by version)."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    base = getattr(hub.errors, "HTTPError", None)  # httpx's or requests' HTTPError
    if isinstance(base, type):
        errors.append(base)
    return tuple(errors)


def _relay(progress, total: int | None):
    """A tqdm class that shows nothing and passes each chunk's size to `progress`."""
    from tqdm.auto import tqdm

    class Relay(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n and progress is not None:
                progress(n, total)

    return Relay


def _probe(endpoint: str, spec: str) -> None:
    """Fail at once when the hub's host cannot be reached (the hub client retries for ~25 s)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return  # the proxy decides; let the client find out
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=10).close()
    except OSError as e:
        raise HomellmError(f"{spec}: cannot download from {endpoint} ({type(e).__name__}: {e}); "
                           "is this machine offline? Without internet, copy the files here and "
                           "pull the local path") from None


def fetch(spec: str, dest: Path, progress=None) -> dict:
    """Download the model files of a hub repo into dest; returns the manifest's `source`.

    Without :file, a repo with config.json gives its Hugging Face files (config, safetensors,
    tokenizer, generation config); a repo of .gguf files must hold exactly one or be named.
    """
    repo, revision, filename = parse_spec(spec)
    hub = _hub()
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = hub.HfApi(endpoint=endpoint)
    where = endpoint or "https://huggingface.co"
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise HomellmError(f"{spec}: HF_HUB_OFFLINE is set, so the hub cannot be reached; "
                           "unset it, or pull a local file or folder")
    _probe(where, spec)
    try:
        listing = {f.path: f.size for f in api.list_repo_tree(repo, revision=revision, recursive=True)
                   if isinstance(f, hub.hf_api.RepoFile)}
        wanted = _choose(spec, repo, listing, filename)
        total = sum(listing[f] or 0 for f in wanted) or None
        for f in wanted:
            hub.hf_hub_download(repo, f, revision=revision, local_dir=dest, endpoint=endpoint,
                                tqdm_class=_relay(progress, total))
            if "/" in f:  # a .gguf in a subfolder: the catalog keeps it at the top
                os.replace(dest / f, dest / Path(f).name)
    except hub.errors.RepositoryNotFoundError:
        raise HomellmError(f"{spec}: no repository {repo!r} on {where} (or it is private or gated: "
                           "set HF_TOKEN)") from None
    except hub.errors.RevisionNotFoundError:
        raise HomellmError(f"{spec}: repository {repo!r} has no revision {revision!r}") from None
    except hub.errors.OfflineModeIsEnabled:
        raise HomellmError(f"{spec}: HF_HUB_OFFLINE is set, so the hub cannot be reached; "
                           "unset it, or pull a local file or folder") from None
    except HomellmError:
        raise
    except _network_errors(hub) as e:
        raise HomellmError(f"{spec}: cannot download from {where} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no detail'}); without internet, "
                           "copy the files here and pull the local path") from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # hf_hub_download's bookkeeping
    for sub in [p for p in dest.iterdir() if p.is_dir()]:
        shutil.rmtree(sub, ignore_errors=True)
    info = {"kind": "hf", "spec": spec, "repo": repo, "revision": revision, "endpoint": endpoint}
    if filename:
        info["file"] = filename
    return info


def _choose(spec: str, repo: str, listing: dict[str, int | None], filename: str | None) -> list[str]:
    from homellm.catalog.pull import hf_wanted

    if filename is not None:
        if filename not in listing:
            raise HomellmError(f"{spec}: repository {repo!r} has no file {filename!r}"
                               + _some_ggufs(listing))
        return [filename]
    if "config.json" in listing:
        wanted = [f for f in listing if hf_wanted(f)]
        if not any(f.endswith(".safetensors") for f in wanted):
            raise ModelFileError(f"{spec}: repository {repo!r} has config.json but no *.safetensors "
                                 "weights (only safetensors are read, never pickled .bin files)")
        return wanted
    ggufs = [f for f in listing if f.endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        raise HomellmError(f"{spec}: repository {repo!r} holds {len(ggufs)} .gguf files; name one, "
                           f"e.g. hf:{repo}:{ggufs[0]}" + _some_ggufs(listing))
    raise ModelFileError(f"{spec}: repository {repo!r} holds neither config.json + *.safetensors "
                         "nor a .gguf file")


def _some_ggufs(listing: dict) -> str:
    ggufs = [f for f in listing if f.endswith(".gguf")]
    return f" (its .gguf files: {', '.join(ggufs[:8])}{', ...' if len(ggufs) > 8 else ''})" if ggufs else ""
