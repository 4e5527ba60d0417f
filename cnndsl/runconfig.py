"""A run's options on disk: `cnndsl train` writes OUT/config.json (the network file and every
option, settled) and `cnndsl train --config FILE` replays it, each option checked against the
command line's (its type and choices); options given on the command line win. `--resume` takes
the options its checkpoint records in the same way."""

import argparse
import json
import re
from pathlib import Path

from .errors import CnnInputError, CnnTrainError, did_you_mean
from .files import FileTooLarge, NotRegularFile, read_regular, write_file


def write(path: Path, file, config: dict) -> None:
    """OUT/config.json: the network file and every option, settled (what `--config` replays)."""
    try:
        write_file(path, json.dumps({"file": str(file), **config}, indent=2) + "\n")
    except OSError as err:
        raise CnnTrainError(f"cannot write {path}: {err.strerror or err}") from None


MAX_CONFIG_BYTES = 2**20  # a config.json holds some 30 options: ~1 KB

# What a resumed run does not take from its checkpoint: where it writes and runs, its fusion level
# (a flag with no way back to the default) and --sync-bn (how its processes share batch norms).
NOT_RESUMED = ("out", "device", "fuse", "sync_bn")


def defaults(parser, path) -> dict:
    """The options a config.json records, checked against `parser`'s, as its defaults."""
    try:
        config = json.loads(read_regular(Path(path), MAX_CONFIG_BYTES))
    except NotRegularFile:
        raise CnnInputError(f"--config {path}: not a regular file") from None
    except FileTooLarge as err:
        raise CnnInputError(f"--config {path}: {err.size:,} bytes, more than the {MAX_CONFIG_BYTES:,} a config.json "
                            "of options holds") from None
    except OSError as err:
        raise CnnInputError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:  # (json refuses deep nesting with RecursionError)
        raise CnnInputError(f"--config {path}: not a JSON file ({str(err)[:200] or 'nested too deeply'})") from None
    if not isinstance(config, dict):
        raise CnnInputError(f"--config {path}: expected a JSON object of options, as OUT/config.json holds")
    return _checked(parser, config, f"--config {path}")


def resumed(parser, args) -> tuple[dict, Path]:
    """The options the checkpoint that `train --resume` continues (the one given, else OUT/last.pt)
    was trained with (its config, checked against `parser`'s), as the defaults of the run that
    resumes it, but for NOT_RESUMED; and the checkpoint's path."""
    from . import api, checkpoint
    from .train import CHECKPOINT, out_folder
    path = Path(args.resume) if args.resume else out_folder(args.out, api.parse(Path(args.file)).name) / CHECKPOINT
    config = checkpoint.load(path)["config"]
    return _checked(parser, {k: v for k, v in config.items() if k not in NOT_RESUMED}, str(path)), path


def name_origin(err, parser, args, taken: dict, where: str | None) -> None:
    """A note on `err` for each option it names whose value came from `where` (a config.json or
    a checkpoint) rather than the command line: the user did not type it, so say where it is from."""
    for action in parser._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or action.dest not in taken or getattr(args, action.dest, None) != taken[action.dest]:
            continue
        if re.search(re.escape(flag) + r"(?![\w-])", f"{err.message} {err.hint or ''}"):
            err.notes.append(f"{flag} {_shown(taken[action.dest])} came from {where}; give {flag} to change it")


def _checked(parser, config: dict, where: str) -> dict:
    """`config`'s options as `parser`'s defaults, each checked against its option's type and choices."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "resume")}
    out = {}
    for key, value in config.items():
        if key == "nproc":  # (a file that says how many processes to start is not one cnndsl writes)
            raise CnnInputError(f"{where}: nproc is not an option a file sets: give --nproc on the command line")
        if key == "fuse":
            if value not in (True, False, "block") or isinstance(value, (int, float)) and not isinstance(value, bool):
                raise CnnInputError(f"{where}: fuse is {value!r:.60}, not a fusion level (true, \"block\" or false)")
            out["no_fuse"], out["block_fusion"] = value is False, value == "block"
            continue
        action = actions.get(key)
        if action is None:
            raise CnnInputError(f"{where}: unknown option {key!r}", hint=did_you_mean(key, [*actions, "fuse"]))
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            ok = isinstance(value, bool)
        elif value is None or isinstance(value, bool):
            ok = value is None and action.default is None  # true and false are only a flag's; null an unset one's
        elif action.type is int:
            ok = isinstance(value, int)
        elif action.type is float:
            ok = isinstance(value, (int, float))
        else:
            ok = isinstance(value, str) and (not action.choices or value in action.choices)
        if not ok:
            raise CnnInputError(f"{where}: {key} is {value!r:.60}, not a value --{key.replace('_', '-')} "
                                f"takes" + (f" ({', '.join(action.choices)})" if action.choices else ""))
        out[key] = value
    if out.get("no_fuse") and out.get("block_fusion"):
        raise CnnInputError(f"{where}: no_fuse and block_fusion are both set; give one fusion level")
    return out


def _shown(value) -> str:
    """An option's value as the command line would give it (a flag's as on or off)."""
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "unset"}[value]
    text = str(value)  # (a config.json's number can have thousands of digits)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text):,} characters)"
