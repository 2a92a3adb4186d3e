"""`wbsr-export`: checkpoint -> bundle folder, and TensorRT engines for a bundle.

    wbsr-export --ckpt CK.pt [--out engines/NAME] [--fp16] [--trt] [--max-batch B] [--patch P] [--overlap O]
    wbsr-export --bundle DIR --trt [--fp16] ...      (no torch, no checkpoint: builds engines on this device)

User errors print one line on stderr and exit 2; a failed parity check exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wbsr_runtime import defaults
from wbsr_runtime.fileio import exit_code, interrupts_as_exceptions, one_line

from .errors import ParityError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wbsr-export", description="Export a WBSR checkpoint to a runtime bundle."
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", type=Path, help="checkpoint written by wbsr-train / wbsr-calibrate")
    src.add_argument("--bundle", type=Path, help="existing bundle to add TensorRT engines to (with --trt)")
    p.add_argument("--out", type=Path, help=f"bundle folder (default: {defaults.EXPORT_DIR}/<checkpoint stem>)")
    p.add_argument(
        "--fp16",
        action="store_true",
        help=f"also export fp16 graphs; with --trt build fp16 engines (default {defaults.ENGINE_PRECISION})",
    )
    p.add_argument("--trt", action="store_true", help="build TensorRT engines for this GPU (needs tensorrt)")
    p.add_argument("--max-batch", type=int, help=f"largest tile batch (default {defaults.MAX_BATCH})")
    p.add_argument("--patch", type=int, help=f"default LR core tile size (default {defaults.PATCH})")
    p.add_argument("--overlap", type=int, help=f"LR context on each side of a tile (default {defaults.OVERLAP})")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-torch-programs", action="store_true", help="skip the torch.export .pt2 programs")
    p.add_argument("--workspace-mb", type=int, help=f"TensorRT workspace limit (MiB; default {defaults.WORKSPACE_MB})")
    p.add_argument("--opt-level", type=int, help=f"TensorRT builder optimisation (0-5; default {defaults.OPT_LEVEL})")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The options the user gave; the others take the library's defaults (`wbsr_runtime.defaults`)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _engine_options(args: argparse.Namespace) -> dict:
    precision = {"precision": "fp16"} if args.fp16 else {}
    return {**precision, **_given(args, "max_batch", "patch", "overlap", "workspace_mb", "opt_level")}


def _run(args: argparse.Namespace) -> str:
    """Do the work; returns the line to print on success."""
    from .attach import add_engines

    if args.bundle is not None:
        if not args.trt:
            raise ValueError(
                "--bundle only adds TensorRT engines: pass --trt (export a checkpoint with --ckpt)"
            )
        records = add_engines(args.bundle, **_engine_options(args))
        return f"added {len(records)} TensorRT engines to {args.bundle}"
    from .bundle import export_bundle  # imports torch: only on this path

    out = args.out if args.out is not None else Path(defaults.EXPORT_DIR) / args.ckpt.stem
    export_bundle(args.ckpt, out, fp16=args.fp16, force=args.force, torch_programs=not args.no_torch_programs,
                  **_given(args, "max_batch", "patch", "overlap"))
    if args.trt:
        records = add_engines(out, **_engine_options(args))
        return f"wrote bundle {out} with {len(records)} TensorRT engines"
    return f"wrote bundle {out}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with interrupts_as_exceptions():  # SIGTERM/SIGHUP: the temporary bundle folder is removed as on Ctrl-C
            print(_run(args))
    except KeyboardInterrupt as e:
        print("wbsr-export: interrupted, nothing written", file=sys.stderr)
        return exit_code(e)
    except ModuleNotFoundError as e:
        from wbsr_train.cli import missing_torch

        line = missing_torch("wbsr-export", "export", e)
        if line is None:
            raise
        print(f"wbsr-export: error: {line}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # CheckpointError, BundleError, ExportError, TensorRT errors: ValueError/RuntimeError subclasses.
        print(f"wbsr-export: error: {one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, ParityError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
