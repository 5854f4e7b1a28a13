"""The sharded state of an FSDP run: its model and optimizer shards in a checkpoint's dcp/ folder.

Every rank writes its own shards with torch.distributed.checkpoint (DCP), and DCP reshards on load, so
a checkpoint written by N processes resumes on any number of them. Next to dcp/, the checkpoint's
model.safetensors holds the consolidated model (gathered to rank 0), so export, eval and slope.load
read an FSDP checkpoint like any other; only resume loads dcp/.
"""

from __future__ import annotations

from pathlib import Path

from slope.io.format import SHARDED_DIR, FormatError, one_line


def has_sharded_state(checkpoint_dir: Path) -> bool:
    """Whether a checkpoint was written by an FSDP run (its model and optimizer state are in dcp/)."""
    return (Path(checkpoint_dir) / SHARDED_DIR).is_dir()


def save_sharded_state(folder: Path, model, optimizer) -> None:
    """The model's and optimizer's shards of this rank into `folder` (collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    # the model's own state_dict (DTensor shards, masks and SlopeLinear's mask_state as whole tensors):
    # DCP's get_model_state_dict would look each key up as a module attribute, which mask_state is not
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded_state(checkpoint_dir: Path, model, optimizer) -> None:
    """Load dcp/ into an FSDP model and its optimizer, resharded to this world size (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    folder = Path(checkpoint_dir) / SHARDED_DIR
    # the shapes and shards to fill, at this world size; DCP reads what each rank needs of every shard
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as err:  # a shard missing or of other shapes: DCP raises one CheckpointException
        raise FormatError(f"{folder}: cannot load the sharded state ({one_line(err)})") from err
    model.load_state_dict(state["model"], strict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optim"])
