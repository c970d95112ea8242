"""The command line: ``python -m longnet_lightning {fit,validate,test,predict} --config ...``.

:class:`LongNetCLI` is a ``LightningCLI`` over :class:`~longnet_lightning.lm.LongNetLM` (or any
subclass, by ``class_path``) and any ``LightningDataModule`` (default
:class:`~longnet_lightning.data.LongTextDataModule`). Configs are YAML with OmegaConf ``${...}``
interpolation. What it adds to LightningCLI:

- the data's ``vocab_size`` and ``seq_len`` are linked into the model (set them once, in ``data``);
- default callbacks: ``checkpoint`` (a ModelCheckpoint every N steps plus ``last.ckpt``),
  ``lr_monitor``, ``throughput`` (tokens/s and MFU), ``prediction_writer``; default loggers CSV +
  TensorBoard (when installed), all under ``<trainer.default_root_dir>/lightning_logs/version_N/``
  next to the resolved ``config.yaml``; ``validate``/``test``/``predict`` never write into the working directory
  (without a root they use the checkpoint's run root, see :meth:`LongNetCLI.instantiate_trainer`);
- ``--ckpt_path`` is checked first (:func:`~longnet_lightning.checkpoint.read_checkpoint`): a
  missing, truncated or damaged file, one that is not a LongNetLM checkpoint, or one naming a model
  class outside longnet_lightning that the user did not name is a one-line error, not a traceback.
  ``--ckpt_path last`` is the newest ``last.ckpt`` under the run's root and a folder is the newest
  ``last.ckpt`` under it (:func:`~longnet_lightning.checkpoint.newest_last_checkpoint`); with none,
  an error names where it looked. Outside ``fit``, sampling settings left at their defaults come
  from the checkpoint; ``predict`` without a checkpoint says to pass one.
- every configuration error is one line naming the setting, the value and what is valid
  (:func:`one_line`; the cases are listed, and tested, in ``docs/bad-inputs.md``), exit status 2;
  set ``LONGNET_DEBUG=1`` to see tracebacks and jsonargparse's own reports;
- the ``omegaconf+`` parser mode: ``${...}`` in a recipe is resolved after the command line is
  merged, so ``${trainer.val_check_interval}`` follows ``--trainer.val_check_interval 7``;
- quiet defaults: a progress bar that knows its total after a mid-epoch resume, and no Lightning
  notices that do not concern the run.

Plugins: any ``class_path`` importable from the working directory or ``PYTHONPATH`` works for
``model`` (a LongNetLM subclass), ``data`` and ``trainer.callbacks``; nothing here must change.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import checkpoint as ckpt_format
from .callbacks import LRMonitor, PredictionWriter, ResumeAwareProgressBar, RichBar, Throughput
from .lm import LongNetLM

PARSER_MODE = "omegaconf+"  # interpolation after merging config files and command line
DESCRIPTION = (
    "LongNet language models with PyTorch Lightning: fit, validate, test, predict "
    "(configs: --config recipes/<name>.yaml). Long-context perplexity tables: "
    "`python -m longnet_lightning evaluate --help`."
)
DEBUG_ENV = "LONGNET_DEBUG"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# generation settings: outside fit, those left at LongNetLM's defaults come from the checkpoint
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "generation_seed", "stop_at_eos")
# warnings that say nothing to the user of this CLI (Lightning and torch internals)
QUIET = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning calling a deprecated torch API
)
QUIET_OUTSIDE_FIT = (
    # the checkpoint's own ModelCheckpoint state: irrelevant when only the weights are used
    r".*callbacks used to create the checkpoint need to be provided.*",
)
_LM_DEFAULTS = {k: p.default for k, p in inspect.signature(LongNetLM.__init__).parameters.items()}


class _NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing ..." lines (product advice, not about the run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_NO_ADVERTS = _NoAdverts()


class CLIError(Exception):
    """A user error the CLI reports as one line (no traceback)."""


# ----------------------------------------------------------------------------- one-line errors

_UNION_NOISE = "Does not validate against any of the Union subtypes"


def _own_error(ex: BaseException | None) -> BaseException | None:
    """The innermost error in ``ex``'s chain that a constructor raised (not jsonargparse's
    wrapping of it), e.g. ``seq_len=0 must be ...`` under "Does not validate against any of the
    Union subtypes"; None if the chain holds only jsonargparse's own errors."""
    found, seen = None, set()
    while ex is not None and id(ex) not in seen:
        seen.add(id(ex))
        if isinstance(ex, CLIError):
            return ex
        tb = ex.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename if tb is not None else ""
        if _UNION_NOISE not in str(ex) and "jsonargparse" not in where and isinstance(ex, (ValueError, TypeError,
                                                                                          OSError)):
            found = ex
        ex = ex.__cause__ or ex.__context__
    return found


def _section(message: str, own: BaseException | None = None) -> tuple[str, set[str]]:
    """``("data.", its settings)`` / ``("model.", ...)``: the part of the config an error belongs
    to, from the object whose method raised ``own`` (a LightningDataModule or LightningModule),
    else from jsonargparse's message (with no settings known)."""
    from lightning.pytorch import LightningModule

    tb = own.__traceback__ if own is not None else None
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        for base, name in ((LightningDataModule, "data."), (LightningModule, "model.")):
            if isinstance(obj, base):
                return name, set(inspect.signature(type(obj).__init__).parameters) - {"self"}
        tb = tb.tb_next
    head = message.split("Errors:", 1)[0]
    if "Subtypes:" in head:
        return ("data." if "datamodule" in head.lower() or ".data." in head else "model."), set()
    keys = re.findall(r'Parser key "([^"]+)"', message)
    return (f"{keys[0]}." if keys and keys[0] in ("data", "model") else ""), set()


def one_line(message: str, ex: BaseException | None = None) -> str:
    """A configuration error as one line that names the setting, the value and what is valid.

    jsonargparse reports a bad value inside ``model``/``data`` as a many-line "Does not
    validate against any of the Union subtypes ... Given value: Namespace(...)"; the useful part
    is the constructor's own message (``seq_len=0 must be an integer >= 1.``), or the innermost
    ``Parser key "x": Expected a <class 'int'>. Got value: y`` / ``Option 'x' is not accepted``.
    """
    own = _own_error(ex)
    if own is not None and not isinstance(own, CLIError):
        text = " ".join(str(own).split())
        section, settings = _section(message, own)
        first = re.match(r"([a-z_]+)[= ]", text)
        if section and first and first.group(1) in settings:
            text = section + text  # "seq_len=0 must be ..." -> "data.seq_len=0 must be ..."
        return text
    if own is not None:
        return str(own)
    keys = [k for k in re.findall(r'Parser key "([^"]+)"', message) if k != "init_args"]
    path = ".".join(k.replace(".init_args", "") for k in keys)
    bad_type = re.search(r"Expected a <class '([\w.]+)'>\. Got value: (.*)", message)
    if _UNION_NOISE in message or keys:
        section = _section(message)[0]
        if bad_type and bad_type.group(1) != "NoneType":
            name = path if path.startswith(section) else section + path.split(".", 1)[-1] if section else path
            return f"{name}={bad_type.group(2).strip()!r} is not valid: expected {_type_word(bad_type.group(1))}"
        option = re.search(r"Option '([^']+)' is not accepted", message)
        if option:
            owner = re.search(r"class_path '([^']+)'", message)
            return (f"{section}{option.group(1)} is not a setting of {owner.group(1) if owner else section[:-1]}; "
                    "see --help for the valid ones")
        choice = re.search(r"Expected a (typing\.Literal\[.*?\]|<enum .*?>)\. Got value: (.*)", message)
        if choice:
            return f"{path}={choice.group(2).strip()!r} is not valid: expected one of {choice.group(1)}"
    text = " ".join(message.split())
    if "unrecognized arguments" in text:
        text += " (see --help for the valid ones)"
    return text


def _type_word(name: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(name, name)


class LongNetArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line (:func:`one_line`), raised as
    :class:`CLIError` (set ``LONGNET_DEBUG=1`` for jsonargparse's own report)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get(DEBUG_ENV):
            return super().error(message, ex)
        raise CLIError(one_line(message, ex))


class LongNetCLI(LightningCLI):
    """LightningCLI for LongNet language models (see the module docstring).

    Every keyword of ``LightningCLI`` can be overridden; ``args`` works as there (a list of
    command-line words, or a dict).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LongNetLM)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 1234)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", LongNetArgumentParser)  # LongNetLM configures AdamW + schedule itself
        mode = {"parser_mode": PARSER_MODE}
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        for key in (None, *SUBCOMMANDS):  # subcommand parsers do not inherit the parser mode
            if key is None:
                parser_kwargs = {**mode, "prog": "python -m longnet_lightning", "description": DESCRIPTION,
                                 **parser_kwargs}
            else:
                parser_kwargs[key] = {**mode, **parser_kwargs.get(key, {})}
        kwargs["parser_kwargs"] = parser_kwargs
        # omegaconf+ resolves ${...} after merging every source, so an interpolation in a recipe
        # follows a command-line override; a recipe's absolute paths (${trainer.x}) are relative
        # to the subcommand's config, which is what this setting makes them
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
            logging.getLogger(name).addFilter(_NO_ADVERTS)  # the same filter object: added once
        self._ckpt_hparams: dict | None = None
        try:
            super().__init__(*args, **kwargs)
        except CLIError:
            raise
        except (ValueError, FileNotFoundError) as e:
            cause = e
            while cause is not None and not isinstance(cause, CLIError):  # raised inside a link
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            if os.environ.get(DEBUG_ENV):
                raise
            raise CLIError(f"{one_line(str(e), e)}  (set {DEBUG_ENV}=1 for the traceback)") from e

    # ------------------------------------------------------------------ parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({
            "model": {"class_path": "longnet_lightning.lm.LongNetLM"},
            "data": {"class_path": "longnet_lightning.data.LongTextDataModule"},
        })
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.every_n_train_steps": 1000,
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": -1,
        })
        parser.add_lightning_class_args(LRMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=self._vocab_from_data,
                              apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.seq_len", compute_fn=self._seq_len_from_data,
                              apply_on="instantiate")

    def _seq_len_from_data(self, data: Any) -> int | None:
        """The data module's seq_len, else the checkpoint's (e.g. for prompts)."""
        seq_len = getattr(data, "seq_len", None)
        if seq_len is None:
            return (self._ckpt_hparams or {}).get("seq_len")
        return int(seq_len)

    def _vocab_from_data(self, data: Any) -> int | None:
        """The data module's vocab_size; a checkpoint's when the data has none; an error if they differ."""
        vocab = getattr(data, "vocab_size", None)
        saved = (self._ckpt_hparams or {}).get("vocab_size")
        if vocab is not None and saved is not None:
            try:
                ckpt_format.check_tokenizer(vocab, saved, "the data of ckpt_path's model")
            except ValueError as e:
                raise CLIError(str(e)) from None
        return saved if vocab is None else int(vocab)

    # ------------------------------------------------------------------ checkpoints

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path``; take the model's architecture (and class) from the checkpoint.

        Unlike plain LightningCLI, only the settings that define the weights
        (:func:`~longnet_lightning.checkpoint.architecture_keys`) come from the checkpoint;
        optimizer, generation and other settings stay as configured, so e.g.
        ``predict --model.max_new_tokens 50`` works. A stored class path is used only if it is
        inside longnet_lightning or is the ``model.class_path`` the user gave.
        """
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path == "last" or (ckpt_path and os.path.isdir(os.path.expanduser(str(ckpt_path)))):
            ckpt_path = self._resolve_last(sub, ckpt_path)
        if sub == "predict" and not ckpt_path:
            self._predict_without_checkpoint()
        if not ckpt_path or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
            return
        model_cfg = self.config[sub].get("model")
        named = model_cfg.get("class_path") if model_cfg is not None else None
        try:
            ckpt = ckpt_format.read_checkpoint(ckpt_path)
            class_path = ckpt_format.stored_class_path(ckpt)
            if class_path is not None:
                ckpt_format.check_class_path(class_path, named, f"ckpt_path={str(ckpt_path)!r}")
        except ckpt_format.CheckpointError as e:
            raise CLIError(str(e)) from None
        hparams = ckpt_format.hyperparameters(ckpt)
        del ckpt
        self._ckpt_hparams = hparams
        if not hparams:
            return
        init = model_cfg.get("init_args") if model_cfg is not None else None
        update: dict[str, Any] = {}
        for key in ckpt_format.architecture_keys(hparams):
            given = init.get(key) if init is not None else None
            if given is not None and given != hparams[key] and given != _LM_DEFAULTS.get(key):
                rank_zero_warn(f"model.{key}={given!r} is ignored: the checkpoint's {key}={hparams[key]!r} is used")
            update[key] = hparams[key]
        if sub != "fit":  # sampling settings left at their defaults follow the checkpoint's
            for key in SAMPLING_KEYS:
                given = init.get(key, _LM_DEFAULTS[key]) if init is not None else _LM_DEFAULTS[key]
                if key in hparams and given == _LM_DEFAULTS[key] and hparams[key] != given:
                    update[key] = hparams[key]
        model_update: dict[str, Any] = {"init_args": update}
        if class_path is not None:
            model_update["class_path"] = class_path
        try:
            self.config = self.parser.parse_object({sub: {"model": model_update}}, self.config)
        except SystemExit:
            raise CLIError(f"the model hyperparameters stored in ckpt_path={ckpt_path!r} do not parse") from None

    def _predict_without_checkpoint(self) -> None:
        """``predict`` with no ``--ckpt_path``: an error saying to pass one, unless the data names a
        tokenizer (then the untrained weights are sampled, with a warning)."""
        data = self.config["predict"].get("data") or {}
        init = data.get("init_args") or {}
        if init.get("tokenizer") is None and "tokenizer" in init:
            raise CLIError("predict needs a trained model: pass --ckpt_path with a checkpoint file or a run folder "
                           "(e.g. --ckpt_path runs/quickstart, or --ckpt_path last with --trainer.default_root_dir)")
        rank_zero_warn("predict without --ckpt_path samples from untrained (random) weights; pass --ckpt_path "
                       "with a checkpoint file or a run folder to sample from a trained model")

    def _resolve_last(self, sub: str, given: str) -> str:
        """``--ckpt_path last`` (or a run folder): the newest ``last.ckpt`` of the run's root.

        ``last`` looks under ``checkpoint.dirpath`` when set, else under
        ``<trainer.default_root_dir or the working directory>/lightning_logs/version_*/checkpoints/``;
        a folder given as ``--ckpt_path runs/quickstart`` is searched the same way. The newest
        file (by modification time) wins, so failed or repeated runs never make the path stale;
        with none, a one-line error names where it looked (never a silent restart)."""
        cfg = self.config[sub]
        if given == "last":
            dirpath = (cfg.get("checkpoint") or {}).get("dirpath")
            root = (cfg.get("trainer") or {}).get("default_root_dir") or os.getcwd()
            folders = [Path(dirpath)] if dirpath else [Path(root)]
        else:
            folders = [Path(given).expanduser()]
        found = ckpt_format.newest_last_checkpoint(*folders)
        if found is None:
            where = " or ".join(f"{f}/last.ckpt, {f}/lightning_logs/version_*/checkpoints/last.ckpt" for f in folders)
            raise CLIError(f"ckpt_path={given!r}: no last.ckpt found (looked in {where}); train first, set "
                           "--trainer.default_root_dir to the run's root, or pass the checkpoint file")
        doing = "resuming from" if sub == "fit" else "using"
        rank_zero_info(f"ckpt_path={given!r}: {doing} the newest last.ckpt, {found}")
        self.config[sub]["ckpt_path"] = str(found)
        return str(found)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # prompts in, text out
            parser.set_defaults({"data": {"class_path": "longnet_lightning.data.PromptDataModule"}})
        return parser

    # ------------------------------------------------------------------ trainer

    def instantiate_trainer(self, **kwargs: Any):
        """The Trainer, with every file of the run under its root (never the working directory).

        ``fit`` keeps Lightning's default root (``trainer.default_root_dir``, else the working
        directory). ``validate``/``test``/``predict`` without ``default_root_dir`` use the run
        root of ``--ckpt_path`` (:func:`run_root`); with neither, they write no file at all (no
        logger, no saved config), and say so.
        """
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        root = trainer_cfg.get("default_root_dir")
        if root is None and self.subcommand != "fit":
            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            root = run_root(ckpt_path) if ckpt_path and os.path.isfile(str(ckpt_path)) else None
            if root is None:
                kwargs["logger"] = False
                self.save_config_callback = None
                rank_zero_info(f"{self.subcommand}: no trainer.default_root_dir and no --ckpt_path, so no logs or "
                               "config are written; set --trainer.default_root_dir to keep them")
            else:
                kwargs["default_root_dir"] = root
        if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(root)
        trainer = super().instantiate_trainer(**kwargs)
        for i, cb in enumerate(trainer.callbacks):  # Lightning's default bars -> ours (callbacks.py)
            if type(cb) is TQDMProgressBar:
                trainer.callbacks[i] = ResumeAwareProgressBar(refresh_rate=cb.refresh_rate, leave=cb._leave)
            elif type(cb) is RichProgressBar:
                trainer.callbacks[i] = RichBar(refresh_rate=cb.refresh_rate, leave=cb._leave, theme=cb.theme,
                                               console_kwargs=cb._console_kwargs)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            with warnings.catch_warnings():
                for message in QUIET + (QUIET_OUTSIDE_FIT if subcommand != "fit" else ()):
                    warnings.filterwarnings("ignore", message=message)
                super()._run_subcommand(subcommand)
        except CLIError:
            raise
        except (ValueError, FileNotFoundError) as e:
            if os.environ.get(DEBUG_ENV):
                raise
            raise CLIError(f"{one_line(str(e), e)}  (set {DEBUG_ENV}=1 for the traceback)") from e


def run_root(ckpt_path: str | os.PathLike) -> str:
    """The root of the run that saved ``ckpt_path``: ``<root>/lightning_logs/version_N/checkpoints/x.ckpt``
    gives ``<root>``; a checkpoint elsewhere gives its own folder."""
    folder = Path(ckpt_path).expanduser().resolve().parent
    if folder.name == "checkpoints":
        folder = folder.parent
        if folder.name.startswith("version_") and folder.parent.name == "lightning_logs":
            folder = folder.parent.parent
    return str(folder)


def default_loggers(root_dir: str | os.PathLike | None = None) -> list:
    """CSVLogger, plus a TensorBoardLogger in the same ``version_N/tb`` when tensorboard is installed."""
    root = os.fspath(root_dir) if root_dir is not None else os.getcwd()
    csv = CSVLogger(root, name="lightning_logs")
    loggers = [csv]
    try:
        import tensorboard  # noqa: F401

        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root, name="lightning_logs", version=csv.version, sub_dir="tb",
                                         default_hp_metric=False))
    except ImportError:
        pass
    return loggers


def cli_main(args: list[str] | dict | None = None, **kwargs: Any) -> LongNetCLI:
    """Run the CLI; a :class:`CLIError` becomes ``error: <message>`` on stderr and exit status 2."""
    # jsonargparse's deprecation notices concern Lightning's own calls, not the user's config
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    try:
        return LongNetCLI(args=args, **kwargs)
    except CLIError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = ["CLIError", "LongNetCLI", "cli_main", "default_loggers", "one_line", "run_root"]
