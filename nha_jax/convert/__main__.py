"""CLI: `python -m nha_jax.convert import HF_DIR OUT_DIR ...` and `python -m nha_jax.convert export CONVERTED OUT`.

Exit code 2 on a bad checkpoint or argument (the message names the tensor, shape or feature), 0 on success.
"""
from __future__ import annotations

import argparse
import sys

from nha_jax.convert.architecture import UnsupportedArchitectureError
from nha_jax.convert.converter import NUMPY_DTYPES, export_checkpoint, import_checkpoint
from nha_jax.convert.safetensors_io import MissingTensorError
from nha_jax.model import layer_windows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nha_jax.convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    importer = commands.add_parser("import", help="Hugging Face Llama / Qwen2 folder -> nha-jax converted folder")
    importer.add_argument("hf_dir", help="folder with config.json and *.safetensors")
    importer.add_argument("out_dir", help="new folder for nha_model.json, hf_config.json, params/")
    importer.add_argument("--num-slots", type=int, default=64, help="NHA slots m per kv head (0 = none)")
    importer.add_argument("--window", type=int, default=32, help="window W of the layers that are not full")
    importer.add_argument("--block-size", type=int, default=8,
                          help="layer l keeps a full window when l %% block-size == full-idx (1 = every layer)")
    importer.add_argument("--full-idx", type=int, default=7)
    importer.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))

    exporter = commands.add_parser("export", help="nha-jax converted folder -> Hugging Face folder")
    exporter.add_argument("converted_dir", help="a folder written by `import`")
    exporter.add_argument("out_dir", help="new folder for config.json and *.safetensors")
    exporter.add_argument("--params", default=None,
                          help="params to export instead of the converted ones: a trainer step folder "
                               "(<workdir>/checkpoints/<step>) or a save_params folder")
    exporter.add_argument("--dtype", default=None, choices=tuple(NUMPY_DTYPES),
                          help="weight dtype (default: the source checkpoint's)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import":
            model_cfg = import_checkpoint(args.hf_dir, args.out_dir, num_slots=args.num_slots, window=args.window,
                                          block_size=args.block_size, full_idx=args.full_idx,
                                          compute_dtype=args.compute_dtype)
            # Full layers get the training seq_len, unknown here: any length above the small window marks them.
            windows = layer_windows(model_cfg, seq_len=model_cfg.window + 1)
            full = [layer for layer, w in enumerate(windows) if w > model_cfg.window]
            print(f"imported {args.hf_dir} -> {args.out_dir}: {model_cfg.num_layers} layers, full layers {full}, "
                  f"others window {model_cfg.window} with {model_cfg.num_slots} slots")
        else:
            export_checkpoint(args.converted_dir, args.out_dir, params_dir=args.params, dtype=args.dtype)
            print(f"exported {args.converted_dir} -> {args.out_dir}")
    except (UnsupportedArchitectureError, MissingTensorError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"nha_jax.convert {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
