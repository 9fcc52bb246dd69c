"""Pretrain an NHA language model.

    python train.py --config configs/default.py [--config.key=value ...]
                    [--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]

Exit codes: 0 done or preempted (SIGTERM: saved, resume by running the same command), 1 NaN/inf loss (nothing
saved for the bad step; the last checkpoint is intact), 2 config error (the message names the key and the fix).
--distributed calls jax.distributed.initialize() first (one process per host, or per GPU): on TPU VM slices, SLURM
and Open MPI it finds the coordinator and the process ids itself; elsewhere pass --coordinator_address (or set
JAX_COORDINATOR_ADDRESS), --num_processes and --process_id (docs/LAUNCH.md).
"""
import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="path to a config file defining get_config()")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--coordinator_address", help="with --distributed: HOST:PORT of process 0, where no cluster "
                        "(TPU VM, SLURM, Open MPI) is detected")
    parser.add_argument("--num_processes", type=int, help="with --distributed: number of processes in the job")
    parser.add_argument("--process_id", type=int, help="with --distributed: this process's id in [0, num_processes)")
    args, overrides = parser.parse_known_args(argv)
    cluster_args = {"coordinator_address": args.coordinator_address, "num_processes": args.num_processes,
                    "process_id": args.process_id}
    given = [name for name, value in cluster_args.items() if value is not None]
    if given and not args.distributed:
        print(f"config error: --{given[0]} needs --distributed.", file=sys.stderr)
        return 2

    import jax

    from nha_jax.training import ConfigError, NonFiniteLossError, apply_overrides, load_config_file, train

    unknown = [o for o in overrides if not o.startswith("--config.")]
    if unknown:
        print(f"config error: unknown arguments {unknown}; overrides look like --config.key=value.", file=sys.stderr)
        return 2
    if args.distributed:
        jax.distributed.initialize(**cluster_args)
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
