"""Pretrain an NHA language model.

    python train.py --config configs/default.py [--config.key=value ...] [--distributed]

Exit codes: 0 done or preempted (SIGTERM: saved, resume by running the same command), 1 NaN/inf loss (nothing
saved for the bad step; the last checkpoint is intact), 2 config error (the message names the key and the fix).
--distributed calls jax.distributed.initialize() first (multi-host TPU pods / GPU clusters; one process per host).
"""
import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="path to a config file defining get_config()")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    args, overrides = parser.parse_known_args(argv)

    import jax

    from nha_jax.training import ConfigError, NonFiniteLossError, apply_overrides, load_config_file, train

    unknown = [o for o in overrides if not o.startswith("--config.")]
    if unknown:
        print(f"config error: unknown arguments {unknown}; overrides look like --config.key=value.", file=sys.stderr)
        return 2
    if args.distributed:
        jax.distributed.initialize()
    try:
        config = apply_overrides(load_config_file(args.config), overrides)
        train(config)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
