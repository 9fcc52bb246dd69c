"""Checkpoints with orbax: the train state (params, optimizer, step, rng) plus the data iterator's JSON state.

Saves are asynchronous; orbax writes each step into a temporary directory and renames it when complete, so a
checkpoint half-written by a dying process is never listed, and `latest_step` only ever returns finalized steps.
"""
from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp


def save_params(path: str, params) -> None:
    """Writes a params tree (e.g. nnx.state(model, nnx.Param)) to the new directory `path`, for config.init_params."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), params)


def restore_params(path: str, abstract_params):
    """Reads a save_params directory into the shapes, dtypes and shardings of `abstract_params`."""
    if not Path(path).is_dir():
        raise ValueError(f"config.init_params={path}: no such directory; write one with "
                         "`python -m nha_jax.convert import`.")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(Path(path).absolute(), abstract_params)


class Checkpointer:
    """Keep-last-k checkpoints under <workdir>/checkpoints, one numbered directory per step."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """The newest finalized step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict) -> None:
        """Starts saving `state` (a pytree of jax arrays) and `data_state` (JSON-serialisable) as `step`."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """Restores (state, data_state) of `step` into the shapes, dtypes and shardings of `abstract_state`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                      data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are finalized."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
