"""`slope check PATH`: is a run, checkpoint or export intact? Checksums first, then the mask invariants.

Integrity: a format-2 checkpoint against its manifest, an export against the checksums of its
slope_model.json (format-1 checkpoints predate the manifest; they are only loaded). Then the model
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
                   help="a run directory (every checkpoint), one checkpoint directory, or a compressed export")
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


def check_model_dir(path: Path, kind: str) -> list[str]:
    """Findings for one checkpoint or export: its checksums, then (if those pass) its masks."""
    from slope.convert import slope_layers
    from slope.io import checkpoint
    from slope.io.format import FormatError
    from slope.io.load import load_compressed

    try:  # both loaders check the checksums before they build anything
        if kind == "export":
            model = load_compressed(path, backend="reference")
        else:
            model, _, _ = checkpoint.load_checkpoint(path)
    except FormatError as err:
        return [str(err)]
    return [finding for name, layer in slope_layers(model) for finding in layer_findings(name, layer)]


def run(args) -> int:
    from slope.io import checkpoint
    from slope.io.format import CHECKPOINTS_DIR, INFO_FILE, LATEST_FILE, META_FILE

    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if (path / META_FILE).is_file():
        kind_of_path, targets = "export", [(path, "export")]
    elif (path / INFO_FILE).is_file():
        kind_of_path, targets = "checkpoint", [(path, "checkpoint")]
    elif (path / CHECKPOINTS_DIR).is_dir():
        kind_of_path = "run"
        targets = [(ckpt, "checkpoint") for ckpt in checkpoint.list_checkpoints(path)]
        if not targets:
            print(f"{path}: no complete checkpoint under {CHECKPOINTS_DIR}/")
            print(f"FAILED: {path}: 1 finding(s), 0 checkpoints checked")
            return 1
    else:
        raise UserError(
            f"{path} is not a run directory ({CHECKPOINTS_DIR}/), a checkpoint ({INFO_FILE}) or an export ({META_FILE})"
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
    checked = f"{len(targets)} {targets[0][1]}{'s' if len(targets) > 1 else ''} checked"
    if findings:
        print(f"FAILED: {path}: {len(findings)} finding(s), {checked}")
        return 1
    print(f"OK: {path}: {checked}")
    return 0
