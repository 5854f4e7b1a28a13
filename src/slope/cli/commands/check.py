"""`slope check PATH`: is a run, checkpoint or export intact? Checksums first, then the mask invariants.

PATH: a run directory (every checkpoint), one checkpoint, a compressed export, a Trainer `checkpoint-N/`
(its SlopeCallback export), a serving export (`slope export --serve`) or a sparsified model's
`save_pretrained` folder. A serving export stores its base dense: every sparse layer must keep at
most n nonzero of every m along `in` (else serving it would not be the trained model), and its PEFT
adapter must load onto those layers.

Integrity: a checkpoint against its manifest, an export against the checksums of its
slope_model.json (slope 0.1's format 1 is refused: a finding). Then the model
is built exactly as `slope.load` builds it, and every sparse layer's stored masks are checked:
    - shapes: values (out, in·n/m), row bits (out, in/m), column bits (out/m, in);
    - M_R keeps exactly n of every m along `in` (no stray bits above the m positions);
    - M_C, once computed, keeps exactly n of every m along `out`, and only where M_R keeps a weight
      (W_RC ⊆ W_R), unless fewer than n of that column group are kept at all.
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


def layer_findings(name: str, layer) -> list[str]:
    """What is wrong with one SlopeLinear's stored masks (empty when nothing is)."""
    import torch

    n, m = layer.config.n, layer.config.m
    out_f, in_f = layer.out_features, layer.in_features
    shapes = {"values": (layer.weight, (out_f, in_f * n // m)), "row bits": (layer.row_bits, (out_f, in_f // m))}
    if layer.col_bits is not None:
        shapes["column bits"] = (layer.col_bits, (out_f // m, in_f))
    wrong = [f"{name}: {what} have shape {tuple(t.shape)}, expected {shape}"
             for what, (t, shape) in shapes.items() if tuple(t.shape) != shape]
    if wrong:
        return wrong
    found = []
    shifts = torch.arange(m, dtype=torch.int64)
    rows = layer.row_bits.to(torch.int64)
    row_kept = (rows.unsqueeze(-1) >> shifts) & 1  # (out, in/m, m)
    if (rows >> m).any() or (row_kept.sum(-1) != n).any():
        bad = int(((rows >> m) != 0).logical_or(row_kept.sum(-1) != n).sum())
        found.append(f"{name}: {bad} row group(s) of M_R do not keep exactly {n} of {m}")
    if layer.col_bits is None or layer.column_mask_step < 0:
        return found  # no M_C stored, or not computed yet (it is built on the first training step)
    cols = layer.col_bits.to(torch.int64)
    col_kept = (cols.unsqueeze(1) >> shifts.view(1, m, 1)) & 1  # (out/m, m, in): bit i = row g·m + i
    if (cols >> m).any() or (col_kept.sum(1) != n).any():
        bad = int(((cols >> m) != 0).logical_or(col_kept.sum(1) != n).sum())
        found.append(f"{name}: {bad} column group(s) of M_C do not keep exactly {n} of {m}")
    row_dense = row_kept.reshape(out_f, in_f).view(out_f // m, m, in_f)
    both = (col_kept & row_dense).sum(1)
    # Where a column group keeps fewer than n weights of W_R, M_C also marks zeros of W_R: harmless.
    expected = row_dense.sum(1).clamp(max=n)
    if (both != expected).any():
        bad = int((both != expected).sum())
        found.append(f"{name}: {bad} column group(s) of M_C keep positions W_R does not (W_RC ⊄ W_R)")
    return found


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

    from slope.linear import dense_weight_of

    n, m = marker["slope_config"]["n"], marker["slope_config"]["m"]
    base = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)  # the weights as vLLM reads them
    found = []
    for name in marker["sparse_layers"]:
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
    """Findings for one checkpoint or export: its checksums, then (if those pass) its masks."""
    from slope.convert import HF_CONFIG_FORMAT, slope_layers
    from slope.io import checkpoint
    from slope.io.format import FormatError
    from slope.io.load import load, load_compressed, slope_marker

    try:  # every loader checks what it can (checksums, shapes, the adapter) before it builds anything
        if kind == "export":
            model = load_compressed(path, backend="reference")
        elif kind == "huggingface":
            marker = slope_marker(path)
            found = [] if marker["format"] == HF_CONFIG_FORMAT else serving_findings(path, marker)
            if found:
                return found
            model = load(path, device="cpu", dtype=None, backend="reference")
        else:
            model, _, _ = checkpoint.load_checkpoint(path)
    except FormatError as err:
        return [str(err)]
    return [finding for name, layer in slope_layers(model) for finding in layer_findings(name, layer)]


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
