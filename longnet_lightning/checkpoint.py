"""What a LongNet checkpoint is: its mark, reading and validation, its config, its weights.

A checkpoint is a Lightning checkpoint (a ``torch.save`` zip archive) saved by
:class:`~longnet_lightning.lm.LongNetLM`. Besides Lightning's keys it carries::

    checkpoint[MARK] = {"version": "0.1.0", "config": {...}}   # the LongNetConfig as plain data
    checkpoint["tokenizer_spec"] = {...}                       # the training data's tokenizer
    checkpoint["state_dict"]["model.<name>"]                    # the LongNet's weights (STATE_PREFIX)

so :func:`load_model` rebuilds the :class:`~longnet_lightning.model.LongNet` from the file alone,
without ``LongNetLM`` or the CLI. Older checkpoints without ``config`` are rebuilt from their
``hyper_parameters`` through :func:`config_from_settings`, the one mapping from LongNetLM
settings to a ``LongNetConfig`` (derived from ``dataclasses.fields(LongNetConfig)``, so a new
config field needs no edit here).

:func:`read_checkpoint` refuses, each with its own one-line :class:`CheckpointError`, before any
weight is used: a missing path, a file that is not a PyTorch archive, a truncated archive, an
archive whose bytes were overwritten (every member's CRC-32 is verified), a checkpoint that is
not Lightning's or not ours, and a stored class path outside ``longnet_lightning`` that the user
did not name. Loading uses ``torch.load(weights_only=True)`` only.

This module imports only the model (never the CLI or the LightningModule).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .model import LongNet, LongNetConfig

MARK = "longnet_lightning"  # key every LongNetLM checkpoint carries: {"version", "config"}
STATE_PREFIX = "model."  # LongNetLM.model's weights in the Lightning state_dict
PACKAGE = "longnet_lightning"

CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LongNetConfig))
# Config fields that change how the model runs but not its weights: a checkpoint does not impose them.
RUNTIME_FIELDS = frozenset({"activation_checkpointing", "attn_backend", "attention_settings", "dropout", "loss_chunk_size"})
# LongNetLM settings that are not config fields but select them.
SELECTORS = ("model", "pattern", "overrides")
_ZIP_LOCAL_HEADER = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, reported as one line naming the setting, the file and the fix."""


# ----------------------------------------------------------------------------- finding one


def newest_last_checkpoint(*roots: str | os.PathLike) -> Path | None:
    """The most recently written ``last.ckpt`` directly in, or in any run under, ``roots``:
    ``<root>/last.ckpt``, ``<root>/checkpoints/last.ckpt`` and
    ``<root>/lightning_logs/version_*/checkpoints/last.ckpt``; None if there is none.

    ``--ckpt_path <run folder>`` (and ``--ckpt_path last``) use this, so a path like
    ``runs/quickstart`` stays valid however many runs (failed ones included) took a version."""
    found: list[Path] = []
    for root in roots:
        root = Path(root).expanduser()
        found += [root / "last.ckpt", root / "checkpoints" / "last.ckpt"]
        found += root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    found = [p for p in found if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


# ----------------------------------------------------------------------------- settings -> config


def architecture_keys(settings: dict[str, Any] | None = None) -> tuple[str, ...]:
    """LongNetLM settings that define the weights: the selectors plus every non-runtime config field.

    ``settings`` (e.g. a LongNetLM's hyperparameters) restricts the answer to the names it has.
    """
    keys = SELECTORS + tuple(n for n in CONFIG_FIELDS if n not in RUNTIME_FIELDS and n != "vocab_size")
    return keys if settings is None else tuple(k for k in keys if k in settings)


def config_from_settings(model: str, vocab_size: int | None, *, pattern: str | None = None,
                         overrides: dict[str, Any] | None = None, **settings: Any) -> LongNetConfig:
    """The ``LongNetConfig`` of a preset name, a vocabulary and LongNetLM-style settings.

    ``settings``: any ``LongNetConfig`` field given directly (None = keep the preset's); other
    keys are ignored, so a LongNetLM's whole hyperparameter dict can be passed. ``overrides``:
    more config fields; a field may be given directly or in overrides, not both.
    """
    if vocab_size is None:
        raise ValueError(
            "vocab_size is unknown: the CLI links it from the data module's `vocab_size`; "
            "without the CLI pass LongNetLM(vocab_size=...) or a datamodule with a `vocab_size` attribute"
        )
    kw: dict[str, Any] = dict(overrides or {})
    if "vocab_size" in kw:
        raise ValueError("overrides={'vocab_size': ...}: put vocab_size in LongNetLM(vocab_size=...), not in overrides")
    for name in CONFIG_FIELDS:
        value = settings.get(name)
        if name == "vocab_size" or value is None:
            continue
        if name in kw:
            raise ValueError(f"{name} is given both directly and in overrides; keep one")
        kw[name] = value
    if pattern is not None:
        kw["pattern"] = pattern
    return LongNetConfig.from_name(model, vocab_size=int(vocab_size), **kw)


def config_from_dict(data: dict[str, Any], where: str = "the checkpoint") -> LongNetConfig:
    """A ``LongNetConfig`` from its plain-data form (``LongNetConfig.to_dict()``)."""
    unknown = sorted(set(data) - set(CONFIG_FIELDS))
    if unknown:
        raise CheckpointError(
            f"{where} has model settings {unknown} this version of longnet_lightning does not know; "
            "upgrade longnet_lightning to load it"
        )
    try:
        return LongNetConfig(**data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its model config does not describe a LongNet ({e})") from None


# ----------------------------------------------------------------------------- writing


def mark(checkpoint: dict, config: LongNetConfig, version: str) -> None:
    """Mark ``checkpoint`` (in place) as ours and store the model config as plain data."""
    checkpoint[MARK] = {"version": version, "config": config.to_dict()}


# ----------------------------------------------------------------------------- reading


def _where(setting: str, path: str | os.PathLike) -> str:
    return f"{setting}={str(path)!r}"


def verify_archive(path: str | os.PathLike, setting: str = "ckpt_path") -> Path:
    """The resolved path of a complete, undamaged ``torch.save`` zip archive; CheckpointError otherwise.

    Reads the whole file once to check every member's CRC-32 (torch archives are stored
    uncompressed, so this costs one sequential read).
    """
    where = _where(setting, path)
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{where} does not exist (cwd: {os.getcwd()}); give the path of a .ckpt file")
    if not p.is_file():
        raise CheckpointError(f"{where} is a directory; give the path of a .ckpt file inside it")
    with open(p, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(p):
        if head == _ZIP_LOCAL_HEADER:
            raise CheckpointError(
                f"{where} is truncated: the archive ends before its index ({p.stat().st_size} bytes); "
                "the save or the copy was interrupted, copy the checkpoint again"
            )
        raise CheckpointError(f"{where} is not a PyTorch checkpoint (not a torch.save zip archive); "
                              "give the path of a .ckpt file saved by `python -m longnet_lightning fit`")
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{where} is truncated or damaged ({e}); copy the checkpoint again") from None
    if bad is not None:
        raise CheckpointError(
            f"{where} is damaged: member {bad!r} fails its CRC-32 check (bytes were overwritten); "
            "copy the checkpoint again or use another one"
        )
    return p


def read_checkpoint(path: str | os.PathLike, setting: str = "ckpt_path", verify: bool = True) -> dict:
    """A verified LongNetLM checkpoint, loaded on the CPU with ``weights_only=True`` (memory-mapped).

    Raises :class:`CheckpointError` (one line, see the module docstring) for anything else.
    """
    where = _where(setting, path)
    p = verify_archive(path, setting) if verify else Path(path).expanduser()
    ckpt, err = None, None
    for kw in ({"mmap": True}, {}):
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, **kw)
            break
        except Exception as e:  # noqa: BLE001 - any failure means "not a checkpoint we can read"
            err = e
    if ckpt is None:
        reason = f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{where} is not a readable PyTorch checkpoint ({reason})")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        raise CheckpointError(f"{where} is not a Lightning checkpoint (no state_dict / version keys)")
    if MARK not in ckpt:
        raise CheckpointError(
            f"{where} is a Lightning checkpoint but not one of a LongNetLM "
            "(it was not saved by longnet_lightning); train with `python -m longnet_lightning fit`"
        )
    return ckpt


def hyperparameters(ckpt: dict) -> dict[str, Any]:
    """The LongNetLM settings stored in ``ckpt`` (Lightning's private ``_...`` keys removed)."""
    return {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}


def stored_class_path(ckpt: dict) -> str | None:
    """The LightningModule class path LightningCLI stored in ``ckpt`` (None if none)."""
    value = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    return None if value is None else str(value)


def check_class_path(class_path: str, named: str | None = None, where: str = "the checkpoint") -> str:
    """``class_path`` if it may be imported: inside longnet_lightning, or the one the user named.

    Anything else is refused (importing a module runs its code): CheckpointError naming the fix.
    """
    if class_path == PACKAGE or class_path.startswith(PACKAGE + ".") or (named is not None and class_path == named):
        return class_path
    raise CheckpointError(
        f"{where} names the model class_path={class_path!r}, which is outside longnet_lightning and is not "
        f"imported unless you name it: pass --model.class_path {class_path} if you trust this checkpoint"
    )


def model_config(ckpt: dict, where: str = "the checkpoint") -> LongNetConfig:
    """The checkpoint's ``LongNetConfig``: the stored plain data, else derived from its hyperparameters."""
    stored = (ckpt.get(MARK) or {}).get("config") if isinstance(ckpt.get(MARK), dict) else None
    if stored is not None:
        return config_from_dict(dict(stored), where)
    hp = hyperparameters(ckpt)
    if not hp.get("vocab_size"):
        raise CheckpointError(f"{where} stores no vocab_size in its hyperparameters; it cannot be rebuilt")
    try:
        return config_from_settings(hp.pop("model", "tiny"), hp.pop("vocab_size"), **hp)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its model hyperparameters do not describe a LongNet ({e})") from None


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The LongNet's weights: the ``state_dict`` entries under :data:`STATE_PREFIX`, prefix removed."""
    n = len(STATE_PREFIX)
    return {k[n:]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}


def build_model(ckpt: dict, where: str = "the checkpoint", config: LongNetConfig | None = None) -> LongNet:
    """The LongNet of a read checkpoint, with its weights (on the CPU, eval mode)."""
    net = LongNet(config or model_config(ckpt, where))
    try:
        net.load_state_dict(model_state(ckpt), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"{where}: its weights do not fit the LongNet its config describes ({first}); a LongNetLM subclass "
            "with other modules can be evaluated from Python with "
            "longnet_lightning.evaluation.evaluate_perplexity(model, ...)"
        ) from None
    return net.eval()


def load_model(path: str | os.PathLike, setting: str = "ckpt_path") -> LongNet:
    """Rebuild the :class:`~longnet_lightning.model.LongNet` of a checkpoint file, weights included."""
    return build_model(read_checkpoint(path, setting), _where(setting, path))


def check_tokenizer(tokenizer_vocab: int, model_vocab: int, where: str = "the data") -> None:
    """The one tokenizer/model check: the tokenizer's ids must be exactly the model's vocabulary."""
    if int(tokenizer_vocab) != int(model_vocab):
        raise ValueError(
            f"{where}: the tokenizer has vocab_size={tokenizer_vocab} but the model vocab_size={model_vocab}; "
            "use the tokenizer the model was trained with (data.tokenizer, or the checkpoint's)"
        )


__all__ = [
    "CONFIG_FIELDS",
    "MARK",
    "RUNTIME_FIELDS",
    "STATE_PREFIX",
    "CheckpointError",
    "architecture_keys",
    "build_model",
    "check_class_path",
    "check_tokenizer",
    "config_from_dict",
    "config_from_settings",
    "hyperparameters",
    "load_model",
    "newest_last_checkpoint",
    "mark",
    "model_config",
    "model_state",
    "read_checkpoint",
    "stored_class_path",
    "verify_archive",
]
