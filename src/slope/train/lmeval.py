"""Bridge to EleutherAI lm-eval: run its tasks on a model `slope.load` can read.

The model goes through lm-eval's own Hugging Face wrapper (`HFLM`) as an already-loaded
transformers model, so SlopeLinear layers run exactly as in `slope generate`. One task ships with
slope, `slope_text_perplexity` (lmeval_tasks/slope_text_perplexity.yaml): rolling log-likelihood
over a local JSONL file, so evaluation works fully offline. Any other task name goes to lm-eval's
registry (hub-hosted datasets need network access).

lm-eval is an optional dependency: `pip install 'slope[eval]'`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

LOCAL_TASK = "slope_text_perplexity"
_TASK_DIR = "lmeval_tasks"


class LmEvalError(RuntimeError):
    """lm-eval is missing or was asked for something it cannot run; the message says what to do."""


def local_task_config(jsonl: str | Path | None = None) -> dict:
    """The shipped task definition with its data file resolved to an absolute path.

    jsonl: a file with one {"text": ...} object per line; None uses the bundled sample.
    """
    import yaml

    task_dir = resources.files("slope") / _TASK_DIR
    config = yaml.safe_load((task_dir / f"{LOCAL_TASK}.yaml").read_text())
    if jsonl is None:
        data = Path(str(task_dir / config["dataset_kwargs"]["data_files"]["test"]))
    else:
        data = Path(jsonl).expanduser().resolve()
        if not data.is_file():
            raise LmEvalError(f"{LOCAL_TASK}: data file {data} does not exist")
    config["dataset_kwargs"]["data_files"] = {"test": str(data)}
    return config


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
) -> dict:
    """Run lm-eval `tasks` on the model in `model_dir`; returns lm-eval's results dictionary.

    model_dir: anything `slope.load` accepts (export, run/checkpoint, Hugging Face directory).
    jsonl: data of the local `slope_text_perplexity` task (default: the bundled sample).
    limit: at most this many documents per task (a fraction: that share of them).
    The per-task metrics are under `result["results"][task]`; `format_results` renders a table.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise LmEvalError(f"lm-eval is not installed ({err}); install it with: pip install 'slope[eval]'") from err
    from slope.io.load import load, load_tokenizer

    if not tasks:
        raise LmEvalError("no lm-eval tasks given")
    model = load(model_dir, device=device)
    tokenizer = load_tokenizer(model_dir)
    specs = [local_task_config(jsonl) if task == LOCAL_TASK else task for task in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except KeyError as err:  # lm-eval's answer to an unknown task name
        raise LmEvalError(f"lm-eval does not know task {err}; `lm_eval --tasks list` lists them") from err
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    return results


def format_results(results: dict) -> str:
    """lm-eval's own markdown table of a `run_lm_eval` result."""
    from lm_eval.utils import make_table

    return make_table(results)
