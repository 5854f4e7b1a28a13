"""Bridge to EleutherAI lm-eval: run its tasks on a model `slope.load` can read.

The model goes through lm-eval's own Hugging Face wrapper (`HFLM`) as an already-loaded
transformers model, so SlopeLinear layers run exactly as in `slope generate`. One task ships with
slope, `slope_text_perplexity` (lmeval_tasks/slope_text_perplexity.yaml): rolling log-likelihood
over a local JSONL file, so evaluation works fully offline. Any other task name goes to lm-eval's
registry (hub-hosted datasets need network access).

lm-eval's own command line reaches slope two ways:
- `python -m slope.train.lmeval ARGS...` is `lm_eval ARGS...` with a `slope` model type registered
  (`--model slope --model_args pretrained=DIR[,device=cpu,backend=reference]`, DIR anything `slope.load`
  reads). lm-eval 0.4 has no plugin entry point for models, so plain `lm_eval` cannot know it.
- `lm_eval --include_path TASK_DIR --tasks slope_text_perplexity` (TASK_DIR = `task_dir()`) runs the
  shipped task with any lm-eval model, e.g. `--model hf` on a `slope export --serve` folder
  (`pretrained=OUT,peft=OUT/adapter`) or a `--dense` export.

lm-eval is an optional dependency: `pip install 'slope[eval]'`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from pathlib import Path

LOCAL_TASK = "slope_text_perplexity"
MODEL_NAME = "slope"  # the lm-eval model type `register_model` adds
_TASK_DIR = Path(__file__).resolve().parents[1] / "lmeval_tasks"
# The bundled data of the local task; its yaml names this constant (`!function`), so lm-eval reading the
# yaml from any working directory gets this absolute path.
SAMPLE_DATA = str(_TASK_DIR / "sample.jsonl")


def task_dir() -> Path:
    """The folder of slope's lm-eval task definitions (lm-eval's `--include_path`)."""
    return _TASK_DIR


class LmEvalError(RuntimeError):
    """lm-eval is missing or was asked for something it cannot run; the message says what to do."""


def local_task_config(jsonl: str | Path | None = None) -> dict:
    """The shipped task definition with its data file resolved to an absolute path.

    jsonl: a file with one {"text": ...} object per line; None uses the bundled sample.
    """
    import yaml

    class _Loader(yaml.SafeLoader):
        """The yaml's one `!function` is the data path, filled in below; nothing is imported here."""

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load((_TASK_DIR / f"{LOCAL_TASK}.yaml").read_text(), Loader=_Loader)
    if jsonl is None:
        data = Path(SAMPLE_DATA)
    else:
        data = Path(jsonl).expanduser().resolve()
        if not data.is_file():
            raise LmEvalError(f"{LOCAL_TASK}: data file {data} does not exist")
        check_task_data(data)
    config["dataset_kwargs"]["data_files"] = {"test": str(data)}
    return config


def check_task_data(path: Path) -> None:
    """The local task's data must be JSONL with a string `text` in every object: checked line by line
    here, so a wrong file is one line naming where it goes wrong, not a failure deep inside lm-eval."""
    expected = 'one JSON object per line with a string "text" field'
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise LmEvalError(f"--tasks-data {path}: line {number} is not UTF-8 text (is it a Parquet or "
                                  f"other binary file?); expected {expected}") from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LmEvalError(f"--tasks-data {path}: line {number} is not JSON ({err.msg}); expected "
                                  f"{expected}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise LmEvalError(f"--tasks-data {path}: line {number} has no string \"text\" field (found "
                                  f"{found}); expected {expected}")
            count += 1
    if count == 0:
        raise LmEvalError(f"--tasks-data {path}: no documents; expected {expected}")


@contextlib.contextmanager
def _quiet_hub_retries():
    """Offline, the hub client logs each failed request as a warning before raising: the error that
    follows is reported as one line, so those warnings are held back while tasks load and run."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _quiet_git_lookup():
    """lm-eval records the git commit of the current directory by running `git describe`, whose
    "fatal: not a git repository" reached the terminal on every evaluation outside a repository. The
    lookup keeps its answer (or None); only git's own stderr is held back while it runs."""
    import lm_eval.evaluator as evaluator

    lookup = evaluator.get_git_commit_hash

    def quiet_lookup():
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                return lookup()
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    evaluator.get_git_commit_hash = quiet_lookup
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = lookup


def run_lm_eval(
    model_dir: str | Path,
    tasks: list[str],
    *,
    jsonl: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    output_path: str | Path | None = None,
) -> dict:
    """Run lm-eval `tasks` on the model in `model_dir`; returns lm-eval's results dictionary.

    model_dir: anything `slope.load` accepts (export, run/checkpoint, Hugging Face directory).
    jsonl: data of the local `slope_text_perplexity` task (default: the bundled sample).
    limit: at most this many documents per task (a fraction: that share of them).
    num_fewshot: lm-eval's number of few-shot examples (None: each task's default).
    output_path: also write the results as JSON there (a `.json` file, else `results.json` in that folder).
    The per-task metrics are under `result["results"][task]`; `format_results` renders a table.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise LmEvalError(f"lm-eval is not installed ({err}); install it with: pip install 'slope[eval]'") from err
    from slope.io.format import one_line
    from slope.io.load import load, load_tokenizer

    if not tasks:
        raise LmEvalError("no lm-eval tasks given")
    model = load(model_dir, device=device, inference=True)
    tokenizer = load_tokenizer(model_dir)
    specs = [local_task_config(jsonl) if task == LOCAL_TASK else task for task in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with _quiet_hub_retries(), _quiet_git_lookup():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=_task_manager(), limit=limit, num_fewshot=num_fewshot,
                log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
    except KeyError as err:  # lm-eval's answer to an unknown task name
        raise LmEvalError(f"lm-eval does not know task {err}; `lm_eval --tasks list` lists them") from err
    except OSError as err:  # ConnectionError (offline hub), a dataset missing from the cache, ...
        raise LmEvalError(
            f"cannot load the data of task(s) {', '.join(tasks)} ({one_line(err)}); hub-hosted tasks need network access "
            "(or a datasets cache that holds them)"
        ) from err
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    if output_path is not None:
        write_results(results, output_path)
    return results


@functools.cache
def _task_manager():
    """lm-eval's index of its tasks, built once per process: it reads thousands of task files (~9 s on a
    2-core machine), and simple_evaluate would build a new one on every call."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def write_results(results: dict, output_path: str | Path) -> Path:
    """lm-eval's results dictionary as JSON: at `output_path` if it ends in .json, else in it as results.json."""
    out = Path(output_path)
    file = out if out.suffix == ".json" else out / "results.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return file


def format_results(results: dict) -> str:
    """lm-eval's own markdown table of a `run_lm_eval` result."""
    from lm_eval.utils import make_table

    return make_table(results)


def register_model() -> type:
    """Register the `slope` model type with lm-eval (idempotent); returns its class.

    `--model slope --model_args pretrained=DIR,device=cpu,backend=reference,dtype=float32`: lm-eval's
    Hugging Face wrapper (HFLM) around the model `slope.load(DIR)` builds and its saved tokenizer; other
    HFLM arguments (batch_size, max_length, ...) pass through.
    """
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM

    existing = model_registry.get(MODEL_NAME, None)
    if existing is not None:
        return existing

    class SlopeLM(HFLM):
        def __init__(self, pretrained: str, backend: str = "auto", dtype: str = "auto", **kwargs) -> None:
            import torch

            from slope.io.load import load, load_tokenizer

            torch_dtype = "auto" if dtype in ("auto", None) else getattr(torch, str(dtype), None)
            if not isinstance(torch_dtype, (str, torch.dtype)):
                raise ValueError(f"slope: dtype {dtype!r} is not a torch dtype name (e.g. float32, bfloat16)")
            # lm-eval passes --device (and batch sizes) with the model arguments; the device is slope.load's
            model = load(pretrained, device=kwargs.pop("device", None), dtype=torch_dtype, backend=backend)
            kwargs.pop("tokenizer", None)  # the one saved with the model
            super().__init__(pretrained=model, tokenizer=load_tokenizer(pretrained), **kwargs)

    from lm_eval.api.registry import register_model as lm_register

    return lm_register(MODEL_NAME)(SlopeLM)


def main(argv: list[str] | None = None) -> None:
    """`lm_eval ARGS...` with the `slope` model type registered: `python -m slope.train.lmeval ARGS...`."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise SystemExit(f"lm-eval is not installed ({err}); install it with: pip install 'slope[eval]'") from None
    register_model()
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
