"""lm-evaluation-harness tasks, offline: find them, check their data, run them, read the metrics.

    lm = HomellmLM.from_loaded(open_model(ref), ref.label)      # homellm/eval/harness.py
    suite = find_tasks(["homellm_capitals", "./my_task.yaml"], include_paths=["./tasks"])
    for spec in suite.specs:
        for result in run_task(lm, suite, spec, limit=100, num_fewshot=0):
            result.metrics   # {"acc": 0.65, "acc_stderr": 0.076, ...}

A task is a name lm-eval knows (its own tasks, the example tasks shipped in
homellm/eval/example_tasks, and the YAML files under `include_paths`) or the path of a task
YAML. Offline is the rule: a task over local files reads them (`dataset_path: json` with
`dataset_kwargs.data_files`; relative paths are read from the YAML's own folder), and a task
over a Hugging Face dataset runs only when that dataset is already in the local datasets cache;
nothing is downloaded (HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from homellm.errors import HomellmError

EXAMPLE_TASKS = Path(__file__).parent / "example_tasks"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' builders over local files
TIMED_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def require_lm_eval():
    """The lm_eval module, or a clear error naming the extra to install."""
    try:
        import lm_eval
    except ImportError:
        raise HomellmError("lm-evaluation-harness is not installed: pip install 'homellm[eval]' "
                           "(or pip install lm_eval==0.4.13)") from None
    return lm_eval


OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@contextlib.contextmanager
def offline():
    """No download from the Hugging Face hub inside: datasets and the hub client read these
    variables at import, so their module flags are set too; both are put back afterwards."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    _set_offline_flags(True)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _set_offline_flags(any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                               for k in OFFLINE_ENV))


def _set_offline_flags(value: bool) -> None:
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = value
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = value


@dataclass
class TaskSpec:
    name: str
    config: dict | None = None  # a task's resolved YAML (local data files made absolute)
    source: Path | None = None  # the YAML it came from

    @property
    def load_spec(self):
        return self.config if self.config is not None else self.name


@dataclass
class TaskSuite:
    specs: list[TaskSpec]
    manager: object  # lm_eval TaskManager
    loaded: dict = field(default_factory=dict)  # name -> lm-eval Task, after load()


@dataclass
class TaskResult:
    task: str
    metrics: dict  # {"acc": .., "acc_stderr": ..}; a filtered metric keeps its filter: "exact_match,strip"
    samples: int  # documents evaluated
    model_seconds: float  # time in the model's request methods
    wall_seconds: float  # the whole evaluation (building requests, metrics, lm-eval's bookkeeping)
    raw: dict  # lm-eval's results dict

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.model_seconds if self.model_seconds > 0 else 0.0


def find_tasks(names: list[str], include_paths: list[str | Path] | None = None) -> TaskSuite:
    """Resolve task names and YAML paths; unknown names and bad local data are errors here,
    before any model is loaded."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise HomellmError("--tasks: no task named (expected a comma-separated list of task "
                           "names or task YAML files)")
    paths = [EXAMPLE_TASKS]
    for p in include_paths or []:
        folder = Path(p).expanduser()
        if not folder.is_dir():
            raise HomellmError(f"--include-path {p}: no such folder (expected a folder of task YAML files)")
        paths.append(folder.resolve())
    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    full = None
    specs = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            path = Path(name).expanduser()
            if not path.is_file():
                raise HomellmError(f"task file {name}: no such file")
            specs.append(_yaml_spec(path, None))
            continue
        entry = local.task_index.get(name)
        if entry is not None:
            kind = entry.kind.name
            specs.append(_yaml_spec(entry.yaml_path, name) if kind == "TASK" and entry.yaml_path
                         else TaskSpec(name))
            continue
        if full is None:
            print("indexing lm-eval's own tasks ...", file=sys.stderr, flush=True)
            full = TaskManager(include_path=[str(p) for p in paths])
        if name not in full.task_index:
            near = difflib.get_close_matches(name, full.all_tasks, n=3)
            raise HomellmError(f"unknown task {name!r}" + (f" (did you mean {', '.join(near)}?)" if near else "")
                               + f"; lm-eval {lm_eval.__version__} knows {len(full.all_tasks)} tasks "
                               f"(`lm_eval ls tasks`), and a local task is a YAML file or a name "
                               f"under --include-path")
        specs.append(TaskSpec(name))
    return TaskSuite(specs, full or local)


def _yaml_spec(path: Path, name: str | None) -> TaskSpec:
    from lm_eval.tasks._yaml_loader import load_yaml
    path = path.expanduser().resolve()
    try:
        config = load_yaml(path, resolve_func=True)
    except (OSError, ValueError, ImportError, AttributeError) as e:
        raise HomellmError(f"task file {path}: {e}") from None
    except Exception as e:  # yaml's parser errors
        raise HomellmError(f"task file {path}: not a readable task YAML ({type(e).__name__}: {e})") from None
    if "task" not in config and "group" not in config:
        raise HomellmError(f"task file {path}: no 'task' field (expected an lm-eval task YAML)")
    name = name or str(config.get("task") or config.get("group"))
    if "task" in config:
        _check_local_data(config, path, name)
    return TaskSpec(name, config, path)


def _check_local_data(config: dict, path: Path, name: str) -> None:
    """Make a local task's data files absolute (from the YAML's folder) and check that they
    exist and hold rows: a missing or empty file is an error that names it."""
    builder = config.get("dataset_path")
    if builder not in LOCAL_BUILDERS:
        return
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if not files:
        raise HomellmError(f"task {name} ({path}): dataset_path: {builder} needs "
                           f"dataset_kwargs.data_files (the local files to read)")
    split_files = files if isinstance(files, dict) else {"train": files}
    fixed = {}
    for split, value in split_files.items():
        items = value if isinstance(value, list) else [value]
        absolute = []
        for item in items:
            f = Path(str(item)).expanduser()
            f = f if f.is_absolute() else path.parent / f
            where = f"task {name} ({path}): dataset_kwargs.data_files.{split}: {f}"
            if not f.is_file():
                raise HomellmError(f"{where}: no such file")
            _check_rows(f, builder, where)
            absolute.append(str(f))
        fixed[split] = absolute if isinstance(value, list) else absolute[0]
    config["dataset_kwargs"] = {**kwargs, "data_files": fixed if isinstance(files, dict) else fixed["train"]}
    used = {config.get(k) for k in ("test_split", "validation_split", "training_split", "fewshot_split")} - {None}
    missing = sorted(s for s in used if s not in fixed)
    if isinstance(files, dict) and missing:
        raise HomellmError(f"task {name} ({path}): split {missing[0]!r} is named but "
                           f"dataset_kwargs.data_files has no file for it (it has {', '.join(fixed)})")


def _check_rows(f: Path, builder: str, where: str) -> None:
    if f.stat().st_size == 0:
        raise HomellmError(f"{where}: the file is empty (expected at least one row)")
    if builder != "json" or f.suffix not in (".jsonl", ".ndjson"):
        return
    rows = 0
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HomellmError(f"{where}: line {n} is not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise HomellmError(f"{where}: line {n}: expected a JSON object, got {type(row).__name__}")
            rows += 1
    if rows == 0:
        raise HomellmError(f"{where}: the file has no rows (expected one JSON object a line)")


def load_tasks(suite: TaskSuite) -> None:
    """Build lm-eval's Task objects (reading their data); a dataset that only the hub has is
    an error that says so."""
    for spec in suite.specs:
        if spec.name in suite.loaded:
            continue
        try:
            with offline():
                built = suite.manager.load([spec.load_spec])
        except ConnectionError as e:
            raise HomellmError(
                f"task {spec.name} reads its dataset from the Hugging Face hub ({e}); homellm eval "
                f"runs offline and downloads nothing. Use a local task (a YAML over JSONL files: "
                f"see {EXAMPLE_TASKS}), or fetch the dataset into the local datasets cache "
                f"once where there is internet (datasets.load_dataset)") from None
        except FileNotFoundError as e:
            raise HomellmError(f"task {spec.name}: {e}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise HomellmError(f"task {spec.name}: lm-eval cannot build it: {e}") from None
        suite.loaded[spec.name] = built


def timed(lm) -> dict:
    """Time the model's request methods (any lm-eval LM): returns a dict whose "seconds" grows
    with each call."""
    clock = {"seconds": 0.0}
    for name in TIMED_METHODS:
        method = getattr(lm, name)

        def wrapper(requests, *args, _method=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(requests, *args, **kwargs)
            finally:
                clock["seconds"] += time.perf_counter() - t0
        setattr(lm, name, wrapper)
    return clock


def run_task(lm, suite: TaskSuite, spec: TaskSpec, *, limit: float | None = None,
             num_fewshot: int | None = None, apply_chat_template: bool = False,
             log_samples: bool = False, clock: dict | None = None) -> list[TaskResult]:
    """One task (or group) on one model through lm_eval.simple_evaluate: a result for each
    task lm-eval reports (a group: its own aggregate and each of its tasks). The model and
    wall times are the whole evaluation's."""
    lm_eval = require_lm_eval()
    load_tasks(suite)
    clock = clock if clock is not None else timed(lm)
    before = clock["seconds"]
    built = suite.loaded[spec.name]
    objects = list(built.get("groups", {}).values()) or list(built["tasks"].values())
    t0 = time.perf_counter()
    try:
        with offline():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=objects, task_manager=suite.manager, limit=limit,
                num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=apply_chat_template, log_samples=log_samples)
    except ValueError as e:
        if "did not find any docs" in str(e):
            raise HomellmError(f"task {spec.name}: no documents to evaluate (its split is empty)") from None
        raise
    wall = time.perf_counter() - t0
    model_s = clock["seconds"] - before
    counts = {k: int(v.get("effective", 0)) for k, v in results.get("n-samples", {}).items()}
    out = []
    for name, table in results["results"].items():
        children = results.get("group_subtasks", {}).get(name) or []
        samples = counts.get(name, 0) or sum(counts.get(c, 0) for c in children)
        out.append(TaskResult(name, task_metrics(table), samples, model_s, wall, results))
    return out


def task_metrics(table: dict) -> dict:
    """One task's lm-eval results: "acc,none" keys as "acc"; a filter other than "none" stays
    in the key ("exact_match,strip"); N/A values are left out."""
    metrics = {}
    for key, value in table.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        metrics[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    return metrics
