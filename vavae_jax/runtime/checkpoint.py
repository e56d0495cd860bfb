"""One Orbax CheckpointManager per run: model, optimizers, EMA, step, data iterator and config.

Every process saves and restores (Orbax coordinates multi-host writes). Items:
  state  - the array pytree (parameters, optimizer states, EMA, step, ...)
  data   - the grain iterator state (exact resume of the input pipeline)
  config - the run's config as JSON (what was trained, readable without the code)
  meta   - small JSON facts (e.g. latent statistics, the tokenizer a DiT was trained on)
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _is_remote(path: str) -> bool:
    return "://" in str(path)


def as_path(path: str | pathlib.Path):
    """A local `pathlib.Path`, or an `etils.epath.Path` for gs:// and other remote URLs."""
    if _is_remote(str(path)):
        from etils import epath

        return epath.Path(str(path))
    return pathlib.Path(path).resolve()


class Checkpointer:
    def __init__(self, directory, *, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator=None,
        config=None,
        meta=None,
        force: bool = False,
    ) -> bool:
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(
        self,
        step: int | None,
        abstract_state: Any,
        *,
        data_iterator=None,
        with_config: bool = False,
        with_meta: bool = False,
    ) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        present = set(self.item_names(step))
        if data_iterator is not None:
            if "data" not in present:
                raise ValueError(f"checkpoint step {step} in {self.directory} has no data state")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if with_config and "config" in present:
            items["config"] = ocp.args.JsonRestore()
        if with_meta and "meta" in present:
            items["meta"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {k: restored[k] for k in items}

    def restore_part(
        self, step: int, abstract_part: dict[str, Any], *, optional: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The top-level entries of the `state` item that `abstract_part` names, restored into
        its shapes and shardings; the other entries are not read (sampling reads the EMA
        weights, not the parameters and the optimizer's moments). An entry the checkpoint
        lacks is left out of the result when it is in `optional`, else a KeyError names it."""
        saved = self.state_entries(step)
        abstract_part = {k: v for k, v in abstract_part.items() if k in saved or k not in optional}
        missing = sorted(set(abstract_part) - saved)
        if missing:
            raise KeyError(
                f"checkpoint step {step} in {self.directory} has no state entries {missing} "
                f"(it has {sorted(saved)})"
            )
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_part)
        args = ocp.args.PyTreeRestore(
            abstract_part, restore_args=restore_args, partial_restore=True
        )
        # A handler of its own: this manager may have registered the item's for full restores.
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            return reader.restore(self.directory / str(step) / "state", args=args)

    def item_names(self, step: int) -> list[str]:
        step_dir = self.directory / str(step)
        return [p.name for p in step_dir.iterdir() if p.is_dir()] if step_dir.exists() else []

    # -- what a step holds, read without restoring any array (vavae_jax.runtime.resume) --------
    def state_metadata(self, step: int) -> dict[str, Any]:
        """{"a/b/c": ArrayMetadata (shape, dtype)} of the `state` item of `step`."""
        handler = ocp.StandardCheckpointHandler()
        try:
            tree = handler.metadata(self.directory / str(step) / "state").tree
        finally:
            handler.close()
        return ocp.tree.to_flat_dict(tree, sep="/")

    def state_entries(self, step: int) -> set[str]:
        """The top-level entries of the `state` item of `step` ("params", "ema", ...)."""
        return {k.split("/", 1)[0] for k in self.state_metadata(step)}

    def stored_config(self, step: int) -> dict[str, Any] | None:
        """The `config` item of `step` (a JSON dict), None when the step has none."""
        if "config" not in self.item_names(step):
            return None
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def data_state(self, step: int) -> dict[str, Any] | None:
        """This process's grain iterator state saved at `step` (grain writes one
        `process_<i>-of-<n>.json` per process), None when the step has no `data` item."""
        if "data" not in self.item_names(step):
            return None
        data_dir = self.directory / str(step) / "data"
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not (data_dir / name).exists():
            found = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
            raise FileNotFoundError(
                f"{data_dir} has no {name} but {found}: the checkpoint was written by another "
                f"number of processes; resume with that many"
            )
        return json.loads((data_dir / name).read_text())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, as restore targets."""

    def to_abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(to_abstract, tree)


def on_local_device(tree: Any) -> Any:
    """Restore targets (ShapeDtypeStructs) placed on this process's first device.

    Orbax restores a target without a sharding with the sharding saved in the checkpoint, and
    refuses when that names another topology: a file converted on a CPU host, restored on a GPU
    ("Topology mismatch detected"). Targets with a sharding restore anywhere."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def save_json(path, obj: Any) -> None:
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
