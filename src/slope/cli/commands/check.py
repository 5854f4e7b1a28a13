"""`slope check PATH`: is a run, checkpoint or export intact? Checksums first, then the mask invariants.

PATH: a run directory (every checkpoint), one checkpoint, a compressed export, a Trainer `checkpoint-N/`
(its SlopeCallback export), a serving export (`slope export --serve`) or a sparsified model's
`save_pretrained` folder. A serving export stores its base dense: every sparse layer must keep at
most n nonzero of every m along `in` (else serving it would not be the trained model), and its PEFT
adapter must load onto those layers.

Every check is a reader's own, so what `slope check` passes, `slope.load`, eval, export and resume accept:
    - integrity: a checkpoint against its manifest, an export against slope_model.json (its own checksum,
      and every other file listed with its size and SHA-256); a file missing, altered or not listed is a
      finding, and so is slope 0.1's format 1;
    - a checkpoint's folder name against its step, and its trainer state as a resume reads it
      (`slope.io.checkpoint.check_checkpoint`);
    - the model built as `slope.load` builds it, and every sparse layer's stored masks and step counters
      (`slope.io.format.mask_findings`: exactly n of every m kept along `in`, M_C n:m along `out` within
      M_R once computed, valid counters).
One line per finding, then OK or FAILED. Exit 0 when intact, 1 when damaged, 2 for a bad path.
"""

from __future__ import annotations

from pathlib import Path

from slope.cli.errors import UserError


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("path", metavar="RUN_OR_CKPT_OR_EXPORT",
                   help="a run directory (every checkpoint), one checkpoint directory, a compressed export, a "
                        "Trainer checkpoint-N/, a serving export or a sparsified model's save_pretrained folder")
    p.set_defaults(func=run)


def _marked(path: Path) -> bool:
    """Whether config.json has a slope entry (a damaged one counts: the check reports it)."""
    from slope.io.format import FormatError
    from slope.io.load import slope_marker

    try:
        return slope_marker(path) is not None
    except FormatError:
        return True


def serving_findings(path: Path, marker: dict) -> list[str]:
    """What is wrong with a serving export's base: a sparse layer keeping more than n of m nonzero."""
    from transformers import AutoModelForCausalLM

    from slope.io.format import FormatError, one_line
    from slope.linear import dense_weight_of

    try:
        n, m = marker["slope_config"]["n"], marker["slope_config"]["m"]
        if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
            raise ValueError(f"slope.slope_config has n={n!r}, m={m!r}: expected integers with 1 <= n < m")
        # the weights as vLLM reads them (safetensors only: slope never unpickles)
        base = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise FormatError(f"{path}: cannot load this serving export ({one_line(err)})") from err
    found = []
    for name in marker.get("sparse_layers") or []:
        try:
            weight, _ = dense_weight_of(base.get_submodule(name))  # (out, in)
        except (AttributeError, TypeError):
            found.append(f"{name}: named as a sparse layer, but the base has no linear layer there")
            continue
        if weight.shape[1] % m:
            found.append(f"{name}: in={weight.shape[1]} is not a multiple of m={m}")
            continue
        nonzero = (weight.detach().reshape(weight.shape[0], -1, m) != 0).sum(-1)  # (out, in/m)
        bad = int((nonzero > n).sum())
        if bad:
            found.append(f"{name}: {bad} group(s) keep more than {n} nonzero of {m} (not {n}:{m} sparse)")
    return found


def check_model_dir(path: Path, kind: str) -> list[str]:
    """Findings for one checkpoint or export: every check its readers make (see the module's docstring)."""
    from slope.convert import HF_CONFIG_FORMAT
    from slope.io import checkpoint
    from slope.io.format import FormatError
    from slope.io.load import load, load_compressed, refuse_pickle_only, slope_marker

    try:  # each reader checks what it can (checksums, shapes, masks, the adapter) before it returns a model
        if kind == "export":
            load_compressed(path, backend="reference")
        elif kind == "huggingface":
            marker = slope_marker(path)
            refuse_pickle_only(path)
            found = [] if marker["format"] == HF_CONFIG_FORMAT else serving_findings(path, marker)
            if found:
                return found
            load(path, device="cpu", dtype=None, backend="reference")
        else:
            checkpoint.check_checkpoint(path)
    except FormatError as err:
        return [str(err)]
    return []


def run(args) -> int:
    from slope.io import checkpoint
    from slope.io.format import (
        CHECKPOINTS_DIR,
        HF_CONFIG_FILE,
        INFO_FILE,
        LATEST_FILE,
        META_FILE,
    )
    from slope.io.load import TRAINER_EXPORT_DIR

    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if (path / META_FILE).is_file():
        kind_of_path, targets = "export", [(path, "export")]
    elif (path / TRAINER_EXPORT_DIR / META_FILE).is_file():  # a Trainer checkpoint-N/ with SlopeCallback
        kind_of_path, targets = "export", [(path / TRAINER_EXPORT_DIR, "export")]
    elif (path / INFO_FILE).is_file():
        kind_of_path, targets = "checkpoint", [(path, "checkpoint")]
    elif (path / CHECKPOINTS_DIR).is_dir():
        kind_of_path = "run"
        targets = [(ckpt, "checkpoint") for ckpt in checkpoint.list_checkpoints(path)]
        if not targets:
            print(f"{path}: no complete checkpoint under {CHECKPOINTS_DIR}/")
            print(f"FAILED: {path}: 1 finding(s), 0 checkpoints checked")
            return 1
    elif (path / HF_CONFIG_FILE).is_file() and _marked(path):
        kind_of_path, targets = "Hugging Face folder", [(path, "huggingface")]
    else:
        raise UserError(
            f"{path} is not a run directory ({CHECKPOINTS_DIR}/), a checkpoint ({INFO_FILE}), an export ({META_FILE}), "
            f"a Trainer checkpoint-N/ ({TRAINER_EXPORT_DIR}/{META_FILE}) or a folder slope wrote with "
            f"save_pretrained or `slope export --serve` ({HF_CONFIG_FILE} with a slope entry)"
        )
    findings = []
    if kind_of_path == "run":
        pointer = path / CHECKPOINTS_DIR / LATEST_FILE
        named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
        # a step whose swap a kill interrupted is listed under its leftover name (.tmp-/.old-step_…)
        complete = {ckpt.name.removeprefix(".tmp-").removeprefix(".old-") for ckpt, _ in targets}
        if named is not None and named not in complete:
            findings.append(f"{pointer} names {named[:200]!r}, which is not a complete checkpoint of this run")
            print(findings[-1])
    for target, kind in targets:
        found = check_model_dir(target, kind)
        for finding in found:
            print(finding)
        findings += found
    what = {"huggingface": "folder"}.get(targets[0][1], targets[0][1])
    checked = f"{len(targets)} {what}{'s' if len(targets) > 1 else ''} checked"
    if findings:
        print(f"FAILED: {path}: {len(findings)} finding(s), {checked}")
        return 1
    print(f"OK: {path}: {checked}")
    return 0
