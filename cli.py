"""The command line of train.py (and bench.py): flags generated from the config dataclasses, presets, renamed
flags, and the checks that refuse an impossible combination before any work.

Companion of train.py. Every field of TrainConfig, ModelConfig and LossConfig is a flag; the `# comment` after a
field is its --help (one text, two uses: nanoGPT's configurator.py is the precedent, without its exec). A value
comes from the flag if given, else from the preset (model fields: model.PRESETS; the rest: train.RECIPES),
else from the dataclass default. Exercise it with `python train.py --help` and
`python -m pytest tests/test_resume.py tests/test_reliability.py -k "flag or configuration"`.
"""
import argparse
import inspect
import os
import re
import sys
from dataclasses import fields

import distributed
from losses import LossConfig
from model import ModelConfig

# Flags renamed, old name -> new: the old one still works for one release, with a message naming the new one.
# masked_fraction was a share of a batch's rows, beside mask_ratio and keep_ratio that are shares of patches; the
# image tokenizer was called a dVAE, which a k-means quantiser is not; bench.py's --world was the world size.
RENAMED = {"masked_fraction": "masked_pass_share", "dvae_ckpt": "image_tokenizer_ckpt",
           "dvae_steps": "image_tokenizer_steps", "world": "world_size"}  # bench.py --world: "world" is the shapes world


def field_help(cls) -> dict:
    """The `# comment` after each dataclass field, read from the source."""
    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.*)$")
    return {m[1]: m[2].replace("%", "%%") for line in inspect.getsource(cls).splitlines() if (m := pattern.match(line))}


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def new_flag_names(argv, prog):
    """argv with each RENAMED flag under its new name, saying so on stderr (train.py and bench.py both call this)."""
    out = []
    for arg in map(str, argv):
        old = arg[2:].split("=")[0] if arg.startswith("--") else None
        if old in RENAMED:
            if any(a == f"--{RENAMED[old]}" or a.startswith(f"--{RENAMED[old]}=") for a in map(str, argv)):
                raise ValueError(f"--{old} is the old name of --{RENAMED[old]}: give only --{RENAMED[old]}")
            print(f"{prog}: --{old} is now --{RENAMED[old]}; the old name works until the next release",
                  file=sys.stderr)
            arg = arg.replace(old, RENAMED[old], 1)
        out.append(arg)
    return out


def add_flags(parser, title, cls, default_text=None):
    """One flag per field of the dataclass cls, in a group titled `title`; booleans parse true/false (a bare
    --flag means true). Every default is None, so that parse_train_args can tell a given flag from a default."""
    group, helps = parser.add_argument_group(title), field_help(cls)
    for f in fields(cls):
        kind = parse_bool if f.type in (bool, "bool") else {"int": int, "float": float}.get(str(f.type), None)
        kind = kind or (f.type if callable(f.type) else str)
        bare = {"nargs": "?", "const": True} if kind is parse_bool else {}
        group.add_argument(f"--{f.name}", type=kind, default=None, metavar=type(f.default).__name__.upper(),
                           help=f"{helps.get(f.name, '')} (default: {default_text or f.default})", **bare)


def parse_train_args(argv, train_cls, recipes, doc):
    """train.py's flags -> (TrainConfig, the ModelConfig fields given or set by the recipe, LossConfig)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "training", train_cls)
    add_flags(parser, "model (defaults from --preset)", ModelConfig, "preset")
    add_flags(parser, "losses", LossConfig)
    try:
        argv = new_flag_names(sys.argv[1:] if argv is None else argv, "train.py")
    except ValueError as e:
        parser.error(str(e))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}  # an unknown flag exits here
    preset = given.get("preset", train_cls.preset)
    if preset not in recipes:
        parser.error(f"unknown preset {preset!r}; choose one of {sorted(recipes)}")
    values = {**recipes[preset], **given}
    train = train_cls(**{f.name: values[f.name] for f in fields(train_cls) if f.name in values})
    overrides = {f.name: values[f.name] for f in fields(ModelConfig) if f.name in values}
    try:  # every impossible combination fails here, before any work, naming the fields involved
        loss = LossConfig(**{f.name: values[f.name] for f in fields(LossConfig) if f.name in values})
        ModelConfig.from_preset(train.preset, **overrides)
        check_train_flags(train, overrides)
    except ValueError as e:
        parser.error(str(e))
    return train, overrides, loss


def check_train_flags(train, overrides):
    """Combinations that cannot run, each refused with the flags named."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's, read before any process group exists
    if overrides.get("image_tokenizer") == "dalle" and not train.init_from:
        raise ValueError("image_tokenizer=dalle is FLAVA's published codebook, which is loaded, not trained: "
                         "give --init_from (a Hugging Face FLAVA folder or a checkpoint that has it)")
    distributed.pick_device(train.device, int(os.environ.get("LOCAL_RANK", 0)))
    if train.batch_size < 1 or train.batch_size % world_size:
        raise ValueError(f"batch_size={train.batch_size} must be a positive multiple of the world size {world_size}")
    local = train.batch_size // world_size
    if train.micro_batch < 0 or 0 < train.micro_batch < local and local % train.micro_batch:
        raise ValueError(f"--micro_batch={train.micro_batch} must divide each process's batch, batch_size / "
                         f"world size = {train.batch_size} / {world_size} = {local} (or be 0: no accumulation)")
    if train.fsdp and "RANK" not in os.environ:
        raise ValueError("--fsdp shards the model over torchrun's processes: start with torchrun "
                         "(torchrun --nproc_per_node=N train.py ...)")
    if train.pairs and train.shards:
        raise ValueError("give pairs as --pairs (a manifest) or as --shards (tar shards), not both")
    if train.resume_changes not in ("refuse", "ok"):
        raise ValueError(f"--resume_changes={train.resume_changes!r} must be refuse or ok")
    if train.resume and train.overwrite:
        raise ValueError("--resume continues the run in --out_dir and --overwrite replaces it: give one of them")
    if train.min_loss_scale < 0:
        raise ValueError(f"--min_loss_scale={train.min_loss_scale} must be >= 0")


def fail(prog, error):
    """Bad input at the start: one line naming the path and what was expected, exit status 2 (as argparse's)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)
