"""The ``lycolab`` command. Errors users can fix are one line on stderr, never a traceback.

Exit codes: 0 done; 1 the run failed (a one-line error: bad config, model, image or adapter file, download, a dataset
with nothing usable — or a bug, which keeps its traceback); 2 the command line itself is wrong (argparse's
convention: unknown option, missing argument, a value without its ``--key``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import logging
import os
import sys
import time
import traceback
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class UsageError(Exception):
    """A command line that cannot mean anything (exit 2, like argparse's own errors); the message says what to give."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--key value`` pairs after the known options; values read as TOML literals (numbers, true/false, strings).

    A key with no value is a true flag; several values make a list (``--network_args algo=loha conv_dim=4``).
    """
    overrides: dict[str, Any] = {}
    key = None
    for item in items:
        if item.startswith("--"):
            key, separator, inline = item[2:].partition("=")
            key = key.replace("-", "_")
            if not key.isidentifier():
                raise UsageError(f"{item!r} is not an option name; options look like --key value")
            overrides[key] = _literal(inline) if separator else True
        elif key is None:
            raise UsageError(f"unexpected argument {item!r}; options look like --key value")
        elif overrides[key] is True:
            overrides[key] = _literal(item)
        else:
            previous = overrides[key]
            overrides[key] = (previous if isinstance(previous, list) else [previous]) + [_literal(item)]
    return overrides


def _literal(text: str) -> Any:
    """A TOML literal (number, bool, string, array), else the text itself; a date such as ``2024-01-01`` stays text
    (no sd-scripts key takes a date, but output names often look like one)."""
    if not text:
        return ""
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
    return text if isinstance(value, (datetime.date, datetime.time)) else value


def version() -> str:
    """The installed distribution's version; the source tree's ``lycolab.__version__`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("lycolab")
    except PackageNotFoundError:
        from lycolab import __version__

        return __version__


def _verbosity_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v/-q before the command, and after it too (there ``SUPPRESS`` keeps a value given before)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                       help="debug messages, and the traceback of an error")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                       help="warnings and errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lycolab", description="Train LyCORIS adapters for Stable Diffusion.",
                                     epilog="exit status: 0 done, 1 the run failed, 2 a wrong command line")
    parser.add_argument("--version", action="version", version=f"lycolab {version()}")
    _verbosity_options(parser, 0)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_commands(commands)
    for command in commands.choices.values():
        _verbosity_options(command, argparse.SUPPRESS)
    return parser


def _add_commands(commands) -> None:
    demo = commands.add_parser("demo", help="zero-download end-to-end run on the embedded tiny model")
    demo.add_argument("--out", required=True, help="folder for the model, data, config, output and logs")
    demo.add_argument("--algo", default="loha", choices=("loha", "locon", "lora", "lokr"))
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--arch", default="sd", choices=("sd", "sdxl"),
                      help="sd: the pretrained tiny SD 1.x; sdxl: a tiny SDXL (random weights) with SDXL's defaults")
    train = commands.add_parser("train", help="kohya-compatible training from config_file.toml", allow_abbrev=False)
    train.add_argument("--config_file", required=True)
    train.add_argument("--dataset_config")
    check = commands.add_parser("check-dataset", help="report what training would use: images, repeats, buckets, "
                                "missing captions, duplicates, bad files (exit 1 if nothing is usable)")
    check.add_argument("image_dir", nargs="?", help="a folder of images or of N_name subfolders (the old notebook's "
                       "train_data_dir)")
    check.add_argument("--dataset_config", help="a kohya dataset_config.toml instead of a folder")
    check.add_argument("--config_file", help="also read config_file.toml (train_data_dir, batch size, resolution)")
    check.add_argument("--resolution", default="512", help="for a folder: training resolution (512 or 512,768)")
    check.add_argument("--batch_size", type=int, default=None, help="batch size for steps per epoch")
    check.add_argument("--caption_extension", default=".txt", help="for a folder: caption file extension")
    check.add_argument("--no_duplicates", action="store_true", help="skip the near-duplicate search")
    fetch = commands.add_parser("download", help="a base model or VAE: preset name, hub repo or file, URL, or "
                                "Civitai model (civitai:ID); resumable, checked, atomic")
    fetch.add_argument("source", help="e.g. sd15, anything-v5, anime-vae, owner/repo, owner/repo/file.safetensors, "
                       "https://…, civitai:9409 (--list shows the presets)", nargs="?")
    fetch.add_argument("--to", default="models", help="destination folder")
    fetch.add_argument("--sha256", help="expected checksum, when known")
    fetch.add_argument("--variant", help="for a diffusers repo: its variant weights, e.g. fp16 (half the download); "
                       "components without that variant come in full precision")
    fetch.add_argument("--list", action="store_true", help="list the presets and exit")
    generate = commands.add_parser("generate", help="images with adapters applied; prompts take kohya options "
                                   "(--n negative --w --h --s steps --l CFG --d seed)")
    _model_and_networks(generate)
    generate.add_argument("--prompt", action="append", default=[], help='e.g. "1girl, solo --n lowres --s 28 --d 7"')
    generate.add_argument("--prompt_file", help="a kohya sample-prompt file, one prompt per line")
    generate.add_argument("--out", required=True, help="a .png for one prompt, else a folder")
    generate.add_argument("--sampler", default="euler_a", help="euler_a, ddim, dpmsolver++, … (diffusers schedulers)")
    generate.add_argument("--clip_skip", type=int)
    generate.add_argument("--max_token_length", type=int, choices=(75, 150, 225))
    generate.add_argument("--v_parameterization", action="store_true")
    merge = commands.add_parser("merge", help="bake adapters (with ratios) into the model: a diffusers folder, or "
                                "one A1111-layout file when --out ends in .safetensors")
    _model_and_networks(merge)
    merge.add_argument("--out", required=True, help="folder, or NAME.safetensors for a single fp16 file")
    tag = commands.add_parser("tag", help="WD1.4 tagger: danbooru-style tags for every image of a folder")
    tag.add_argument("image_dir")
    tag.add_argument("--model-dir", "--model_dir", dest="model_dir", default=None,
                     help="folder with model.onnx + selected_tags.csv, or a hub repo id (default: "
                     "SmilingWolf/wd-v1-4-convnextv2-tagger-v2)")
    tag.add_argument("--threshold", type=float, default=0.35, help="general tags")
    tag.add_argument("--character-threshold", "--character_threshold", dest="character_threshold", type=float,
                     default=0.85)
    tag.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    tag.add_argument("--include-rating", "--include_rating", dest="include_rating", action="store_true")
    tag.add_argument("--keep-underscores", "--keep_underscores", dest="keep_underscores", action="store_true")
    _caption_options(tag, ".txt")
    tag.add_argument("--undesired-tags", "--undesired_tags", dest="undesired_tags", default="",
                     help="comma-separated; wildcards allowed (*_hair)")
    tag.add_argument("--trigger-word", "--trigger_word", dest="trigger_word", help="put first, once")
    tag.add_argument("--append", action="store_true", help="add the new tags to existing captions")
    caption = commands.add_parser("caption", help="BLIP captions for every image of a folder")
    caption.add_argument("image_dir")
    caption.add_argument("--model", default="Salesforce/blip-image-captioning-large", help="hub id or folder")
    caption.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    caption.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=1)
    caption.add_argument("--top-p", "--top_p", dest="top_p", type=float, help="nucleus sampling instead of beams")
    caption.add_argument("--min-length", "--min_length", dest="min_length", type=int, default=5)
    caption.add_argument("--max-length", "--max_length", dest="max_length", type=int, default=75)
    caption.add_argument("--prefix", default="")
    caption.add_argument("--suffix", default="")
    _caption_options(caption, ".caption")
    _add_tool_commands(commands)


def _add_tool_commands(commands) -> None:
    """The adapter tools, with sd-scripts' option names (resize_lora.py, svd_merge_lora.py) and LyCORIS'
    extract_locon.py ones for extract."""
    resize = commands.add_parser("resize", help="an adapter at a lower rank (SVD), fixed or per module "
                                 "(sd-scripts' resize_lora.py)")
    resize.add_argument("source", nargs="?", help="the adapter .safetensors (or --model)")
    resize.add_argument("--model", dest="model_option", help="the adapter to resize, as sd-scripts names it")
    resize.add_argument("--save_to", "--out", dest="save_to", required=True, help="the resized .safetensors")
    resize.add_argument("--new_rank", type=int, help="the new rank (the most, with --dynamic_method)")
    resize.add_argument("--new_conv_rank", type=int, help="the new rank of kxk convs (default --new_rank)")
    resize.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"),
                        help="a rank per module from its singular values")
    resize.add_argument("--dynamic_param", type=float, help="sv_ratio: max/min ratio; sv_fro, sv_cumulative: the "
                        "fraction kept (e.g. 0.9)")
    resize.add_argument("--base_model", help="for LoHa/LoKr files whose layers their tensors do not tell")
    _precision_and_device(resize)
    merge = commands.add_parser("merge-adapters", help="several adapters (with ratios) into one adapter file "
                                "(sd-scripts' svd_merge_lora.py; `lycolab merge` bakes adapters into a model)")
    merge.add_argument("--models", nargs="+", required=True, help="adapter files, optionally file:ratio")
    merge.add_argument("--ratios", nargs="+", type=float, help="one per model (default 1, or the :ratio)")
    merge.add_argument("--save_to", "--out", dest="save_to", required=True, help="the merged .safetensors")
    merge.add_argument("--new_rank", type=int, help="SVD to this rank (default: LoRA ranks are concatenated)")
    merge.add_argument("--new_conv_rank", type=int, help="the rank of kxk convs (default --new_rank)")
    merge.add_argument("--base_model", help="for LoHa/LoKr files whose layers their tensors do not tell")
    _precision_and_device(merge)
    extract = commands.add_parser("extract", help="the LoRA/LoCon that turns one model into another (LyCORIS' "
                                  "extract_locon.py)")
    extract.add_argument("base_model", help="the original model: a diffusers folder or a single file")
    extract.add_argument("db_model", help="the fine-tuned model")
    extract.add_argument("output_name", help="the adapter .safetensors to write")
    extract.add_argument("--mode", default="fixed", choices=("fixed", "threshold", "ratio", "quantile"))
    extract.add_argument("--linear_dim", type=int, default=64)
    extract.add_argument("--conv_dim", type=int, default=32)
    for kind in ("linear", "conv"):
        extract.add_argument(f"--{kind}_threshold", type=float, default=0.0)
        extract.add_argument(f"--{kind}_ratio", type=float, default=0.0)
        extract.add_argument(f"--{kind}_quantile", type=float, default=1.0)
    extract.add_argument("--use_cp", action="store_true", help="kxk convs with LyCORIS' Tucker split (lora_mid); "
                         "off by default: plain LoCon keeps far more of the difference at the same rank")
    extract.add_argument("--disable_cp", action="store_true", help="LyCORIS' flag for the default (no Tucker split)")
    extract.add_argument("--unet_only", action="store_true", help="leave the text encoders out")
    extract.add_argument("--model_config", help="for single-file models offline: a diffusers folder of the type")
    _precision_and_device(extract)
    convert = commands.add_parser("convert", help="a LoRA/LoCon between kohya/LyCORIS keys and the PEFT/diffusers "
                                  "layout (save_lora_weights')")
    convert.add_argument("source", help="the adapter .safetensors")
    convert.add_argument("--to", required=True, choices=("kohya", "diffusers", "peft"))
    convert.add_argument("--save_to", "--out", dest="save_to", required=True, help="the converted .safetensors")
    convert.add_argument("--family", choices=("sd", "sdxl"), help="to kohya: the model family (default: read off "
                         "the names)")
    inspect = commands.add_parser("inspect", help="what an adapter file is: algorithm, modules, ranks, alphas, "
                                  "training settings, top tags, dataset folders, hashes")
    inspect.add_argument("source", help="the adapter .safetensors")
    inspect.add_argument("--top_tags", type=int, default=20, help="how many caption tags to list")


def _precision_and_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save_precision", default="fp16", choices=("fp16", "bf16", "float"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (SVD is much faster on a GPU)")


def _caption_options(parser: argparse.ArgumentParser, extension: str) -> None:
    parser.add_argument("--caption-extension", "--caption_extension", dest="caption_extension", default=extension)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the captions lycolab wrote, keeping ones edited since (default: keep all)")
    parser.add_argument("--overwrite-all", "--overwrite_all", dest="overwrite_all", action="store_true",
                        help="replace every existing caption, edited ones too")


def _model_and_networks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: a diffusers folder or hub id")
    parser.add_argument("--network", action="append", default=[], help="adapter file, optionally with a ratio: "
                        "x.safetensors:0.8 (repeatable)")
    parser.add_argument("--vae", help="another VAE (diffusers folder or single file)")
    parser.add_argument("--model_config", help="for a single-file model offline: a diffusers folder of the same "
                        "model type to take the configs from")


def _run_demo(args) -> int:
    from lycolab.demo import run_demo

    started = time.time()
    result = run_demo(args.out, algo=args.algo, epochs=args.epochs, arch=args.arch)
    training = result.training
    print(f"demo finished in {time.time() - started:.1f} s (training {training.seconds:.1f} s, "
          f"{training.total_steps} steps, loss {training.history.losses[0]:.4f} -> "
          f"{sum(training.history.losses[-5:]) / len(training.history.losses[-5:]):.4f})")
    for path in training.saved_files + training.sample_files + [training.loss_plot]:
        print(f"  {path}")
    from lycolab.models.scenes import CONCEPT, TRIGGER_WORD

    print(f"concept {TRIGGER_WORD!r} ({CONCEPT.color} {CONCEPT.shape} on a {CONCEPT.background} background), share "
          f"of samples that show it: base model {result.base_score:.0%}, with the adapter {result.adapter_score:.0%}"
          + (" (the tiny SDXL is not pretrained: this run shows SDXL's path works, not that it learns)"
             if args.arch == "sdxl" else ""))
    print(f"  {result.compare} (top row: base model, bottom row: with the adapter)")
    return 0


def _run_train(args, overrides: dict[str, Any]) -> int:
    from lycolab.config import load_config
    from lycolab.training import train

    config = load_config(args.config_file, args.dataset_config, overrides)
    result = train(config)
    print(f"saved {len(result.saved_files)} file(s) to {config.output_dir}; loss plot {result.loss_plot}")
    return 0


def _run_check_dataset(args) -> int:
    from lycolab.config import load_config, read_dataset_config, validate_dataset
    from lycolab.data.report import check_dataset, folder_datasets

    batch_size = args.batch_size
    if args.config_file:
        overrides = {"train_data_dir": args.image_dir} if args.image_dir else {}
        config = load_config(args.config_file, args.dataset_config, overrides)
        datasets, batch_size = config.datasets, batch_size or config.train_batch_size
    elif args.dataset_config:
        datasets = read_dataset_config(args.dataset_config)
        for dataset in datasets:
            validate_dataset(dataset, args.dataset_config)
    elif args.image_dir:
        datasets = folder_datasets(args.image_dir, args.resolution, args.caption_extension)
    else:
        raise UsageError("give an image folder, --dataset_config or --config_file")
    data_logger = logging.getLogger("lycolab.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # the report lists skipped files itself
    try:
        report = check_dataset(datasets, batch_size or 1, find_duplicates=not args.no_duplicates)
    finally:
        data_logger.setLevel(level)
    print(report.format())
    return 0 if report.usable else 1


def _run_download(args) -> int:
    from lycolab.models.download import download, load_presets

    if args.list or not args.source:
        for name, preset in load_presets().items():
            print(f"{name:<16} {preset.kind:<5} {preset.description}")
        return 0
    # tokens come from HF_TOKEN / CIVITAI_TOKEN only
    print(download(args.source, args.to, sha256=args.sha256, variant=args.variant))
    return 0


def _run_generate(args) -> int:
    from pathlib import Path

    from lycolab.models.generate import generate, parse_network_spec

    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            prompts += Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise ValueError(f"{args.prompt_file}: cannot read the prompt file ({reason}); give a UTF-8 text file, "
                             "one prompt per line") from None
    if not prompts and not args.prompt_file:
        raise UsageError("give --prompt TEXT or --prompt_file FILE")
    if not any(line.strip() and not line.lstrip().startswith("#") for line in prompts):
        raise ValueError(f"{args.prompt_file or '--prompt'}: no prompt in it (blank and # lines are skipped); write "
                         "one prompt per line")
    paths = generate(args.model, prompts, args.out, [parse_network_spec(spec) for spec in args.network],
                     args.sampler, args.vae, args.clip_skip, args.max_token_length, args.v_parameterization,
                     args.model_config)
    for path in paths:
        print(path)
    return 0


def _run_merge(args) -> int:
    from lycolab.models.generate import merge_into_model, parse_network_spec

    if not args.network:
        raise UsageError("give at least one --network FILE[:RATIO]")
    networks = [parse_network_spec(spec) for spec in args.network]
    print(merge_into_model(args.model, networks, args.out, args.vae, model_config=args.model_config))
    return 0


def _run_tag(args) -> int:
    from lycolab.annotate.tags import split_tags
    from lycolab.annotate.wd14 import DEFAULT_REPO, tag_folder

    mode = _write_mode(args, appending=args.append)
    result = tag_folder(args.image_dir, args.model_dir or DEFAULT_REPO, args.threshold, args.character_threshold,
                        args.batch_size, args.caption_extension, args.include_rating, not args.keep_underscores,
                        split_tags(args.undesired_tags), args.trigger_word, mode)
    print(f"tagged {len(result.written)} image(s); {_kept(result)}")
    return 0


def _write_mode(args, appending: bool = False) -> str:
    chosen = [name for name, given in (("append", appending), ("overwrite", args.overwrite),
                                       ("overwrite_all", args.overwrite_all)) if given]
    if len(chosen) > 1:
        raise UsageError(" and ".join(f"--{name.replace('_', '-')}" for name in chosen) + " exclude each other")
    return chosen[0] if chosen else "skip"


def _kept(result) -> str:
    edited = f" ({len(result.kept_edited)} edited since lycolab wrote them; --overwrite-all replaces those)" \
        if result.kept_edited else ""
    return (f"kept {len(result.kept_existing)} existing caption(s){edited}; skipped {len(result.bad_files)} "
            "unreadable file(s)")


def _run_caption(args) -> int:
    from lycolab.annotate.blip import caption_folder

    result = caption_folder(args.image_dir, args.model, args.batch_size, args.num_beams, args.top_p,
                            args.min_length, args.max_length, args.prefix, args.suffix, args.caption_extension,
                            mode=_write_mode(args))
    print(f"captioned {len(result.written)} image(s); {_kept(result)}")
    return 0


def _run_resize(args) -> int:
    from lycolab.tools.resize import resize_adapter

    if bool(args.source) == bool(args.model_option):
        raise UsageError("give the adapter once: as the first argument or as --model")
    print(resize_adapter(args.source or args.model_option, args.save_to, args.new_rank, args.new_conv_rank,
                         args.dynamic_method, args.dynamic_param, args.save_precision, args.device,
                         verbose=args.verbosity > 0, base_model=args.base_model))  # -v: a line per module
    return 0


def _run_merge_adapters(args) -> int:
    from lycolab.models.generate import parse_network_spec
    from lycolab.tools.merge_adapters import merge_adapters

    specs = [parse_network_spec(spec) for spec in args.models]
    if args.ratios is not None and len(args.ratios) != len(specs):
        raise UsageError(f"--ratios has {len(args.ratios)} value(s) for {len(specs)} model(s); give one per model")
    sources = [(path, args.ratios[index] if args.ratios is not None else ratio)
               for index, (path, ratio) in enumerate(specs)]
    print(merge_adapters(sources, args.save_to, args.new_rank, args.new_conv_rank, args.save_precision, args.device,
                         base_model=args.base_model))
    return 0


def _run_extract(args) -> int:
    from lycolab.tools.extract import extract_adapter

    print(extract_adapter(args.base_model, args.db_model, args.output_name, args.mode, args.linear_dim,
                          args.conv_dim, args.linear_threshold, args.conv_threshold, args.linear_ratio,
                          args.conv_ratio, args.linear_quantile, args.conv_quantile, not args.unet_only,
                          args.save_precision, args.device, use_tucker=args.use_cp and not args.disable_cp,
                          config=args.model_config))
    return 0


def _run_convert(args) -> int:
    from lycolab.tools.convert import convert_adapter

    print(convert_adapter(args.source, args.save_to, args.to, family=args.family))
    return 0


def _run_inspect(args) -> int:
    from lycolab.tools.inspect import inspect_adapter

    print(inspect_adapter(args.source, top=args.top_tags))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status is returned (see the module docstring), never raised."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # --help, --version, or argparse's usage error (already printed)
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 2
    logger_level = _configure_logging(args.verbosity)
    from lycolab.errors import user_errors
    from lycolab.files import as_write_error

    try:
        return _run(args, extra)
    except UsageError as error:
        print(f"lycolab {args.command}: error: {error} (lycolab {args.command} --help lists the options)",
              file=sys.stderr)
        return 2
    except user_errors() as error:
        if args.verbosity > 0:
            traceback.print_exc()
        print(f"error: {_first_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; files saved so far are complete", file=sys.stderr)
        return 130
    except OSError as error:  # a write outside lycolab.files (a PNG, a log) on a full or read-only disk
        full = error.errno in (errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC))
        failure = as_write_error(error, error.filename or "the output folder") if full else None
        if failure is None:
            traceback.print_exc()
            print("lycolab: unexpected error (a bug); please report it with the traceback above", file=sys.stderr)
        else:
            print(f"error: {failure}", file=sys.stderr)
        return 1
    except Exception:  # a bug: keep everything needed to report it
        traceback.print_exc()
        print("lycolab: unexpected error (a bug); please report it with the traceback above", file=sys.stderr)
        return 1
    finally:
        logging.getLogger("lycolab").setLevel(logger_level)


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    commands = {"demo": _run_demo, "check-dataset": _run_check_dataset, "download": _run_download,
                "generate": _run_generate, "merge": _run_merge, "tag": _run_tag, "caption": _run_caption,
                "resize": _run_resize, "merge-adapters": _run_merge_adapters, "extract": _run_extract,
                "convert": _run_convert, "inspect": _run_inspect}
    if args.command == "train":
        return _run_train(args, parse_overrides(extra))
    return commands[args.command](args)


def _first_line(error: BaseException) -> str:
    """Our messages are one line; a library's longer one is cut to its first (``-v`` shows it whole)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return lines[0] + (" (… -v shows the rest)" if len(lines) > 1 else "")


def _configure_logging(verbosity: int) -> int:
    """Log to stderr (stdout is left to what a command prints as its result): INFO by default (WARNING in the second
    and later training processes), DEBUG for lycolab's own loggers with -v, WARNING with -q. Returns lycolab's
    logger level before, for ``main`` to restore (tests and notebooks call ``main`` in-process)."""
    from lycolab.log_display import quiet_libraries

    first_process = os.environ.get("RANK", "0") == "0"
    level = logging.WARNING if verbosity < 0 or not first_process else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    package_logger = logging.getLogger("lycolab")
    before = package_logger.level
    package_logger.setLevel(logging.DEBUG if verbosity > 0 else level)
    quiet_libraries()
    return before


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
