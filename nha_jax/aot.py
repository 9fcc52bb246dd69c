"""Compile the sharded train step for a real TPU topology on a CPU host, ahead of time (no TPU attached).

    python -m nha_jax.aot --config configs/nha_340m.py --topology v5p:2x2x1 [--target_days 7] [--config.key=value ...]

Builds the model, optimizer and train step exactly as the trainer does (nha_jax.training), with the devices of
`jax.experimental.topologies.get_topology_desc(topology, platform="tpu")` (libtpu from the `tpu-aot` extra), the
config's mesh over them, abstract inputs (no parameter is ever materialised) and the Mosaic TPU kernels for
attention (model.attention_impl = "pallas_tpu", run under jax.shard_map), then `.lower(...).compile()`.
Prints a table and, as the last line, one JSON object (topology, compiled, memory per device, FLOPs, ...).
Exit codes: 0 compiled and fits the chip's HBM, 1 the compiler (or the tracing before it) refused, or the compiled
step needs more memory per chip than the chip has (compiled stays true, fits_hbm false), 2 bad arguments or config.
Compile-time evidence only: it says the program fits and what it costs, never how fast it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import ml_collections
from jax.sharding import NamedSharding

from nha_jax.model import layer_windows
from nha_jax.sharding import logical_to_mesh_spec, make_mesh
from nha_jax.training.config import ConfigError, apply_overrides, load_config_file, validate, validate_for_devices
from nha_jax.training.loop import resolve_vocab_size
from nha_jax.training.metrics import peak_flops_per_device, train_flops_per_token
from nha_jax.training.optimizer import build_optimizer, learning_rate_schedule
from nha_jax.training.state import count_params, state_layout
from nha_jax.training.step import jit_train_step

GIB = 2 ** 30
# HBM per chip, matched against jax's device_kind (first match wins, as in PEAK_FLOPS_BY_DEVICE_KIND).
HBM_BYTES_BY_DEVICE_KIND = (
    ("TPU v5 lite", 16 * GIB),  # v5e
    ("TPU v5", 95 * GIB),  # v5p
    ("TPU v6 lite", 32 * GIB),  # v6e
)


def hbm_bytes(device_kind: str) -> int | None:
    """HBM of one chip of `device_kind`, or None when unlisted."""
    for kind, size in HBM_BYTES_BY_DEVICE_KIND:
        if kind.lower() in device_kind.lower():
            return size
    return None


def topology_devices(topology: str) -> list:
    """The TPU devices of a topology such as "v5p:2x2x1" (libtpu compiles for them; none needs to be attached)."""
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except ImportError as error:
        raise ConfigError(f"--topology={topology}: libtpu is missing ({error}); "
                          "install the extra: pip install -e '.[tpu-aot]'.") from None
    except Exception as error:  # libtpu raises RuntimeError / XlaRuntimeError for unknown names
        raise ConfigError(f"--topology={topology}: libtpu knows no such topology ({error}); use a name like "
                          "v5e:2x4, v5p:2x2x1, v5p:4x4x4 or v6e:2x4.") from None


def _failure_hint(message: str) -> str:
    """What to change, from the compiler's message."""
    lowered = message.lower()
    if "resource_exhausted" in lowered or "out of memory" in lowered or ("exceeds" in lowered and "memory" in lowered):
        return ("the step does not fit in HBM: raise grad_accum_steps or lower global_batch_size (or seq_len), set "
                "model.remat=full, or spread the state over more devices (mesh.fsdp=-1, a larger topology).")
    if "vmem" in lowered or "mosaic" in lowered or "divisible by 8 and 128" in lowered or "tpu_custom_call" in lowered:
        return ("a Pallas TPU kernel was refused: its blocks must tile (8, 128) and fit VMEM; change the kernel block "
                "sizes (pallas_kernels/tpu.py default_chunk_size) or the head dims / num_slots.")
    if "tensor" in lowered and "heads" in lowered:
        return "set mesh.tensor to a divisor of model.num_kv_heads (and num_heads)."
    if "batch" in lowered or "divide" in lowered:
        return "make global_batch_size / grad_accum_steps divide over mesh.data * mesh.fsdp, or change the mesh."
    return "see the compiler's message above; try a smaller batch, another mesh or other kernel block sizes."


def compile_train_step(config: ml_collections.ConfigDict, topology: str, target_days: float, report: dict) -> None:
    """Lowers and compiles the trainer's jitted train step for `topology`, filling `report` as it goes (so that a
    refused compile still reports the mesh, sizes and FLOPs known before it).

    Raises ConfigError for bad arguments; any other exception is the compiler (or tracing) refusing the program.
    """
    validate(config)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.attention_impl = "pallas_tpu"
    resolve_vocab_size(config)
    devices = topology_devices(topology)
    hosts = len({device.process_index for device in devices})
    mesh_shape = validate_for_devices(config, len(devices), hosts)
    mesh = make_mesh(*mesh_shape, devices=devices)

    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    optimizer = build_optimizer(config.optimizer, config.total_steps)
    layout = state_layout(config, optimizer, mesh)
    batch_sharding = NamedSharding(mesh, logical_to_mesh_spec(("batch", "seq")))
    rows = (config.global_batch_size, config.seq_len)
    batch = {name: jax.ShapeDtypeStruct(rows, jax.numpy.int32, sharding=batch_sharding)
             for name in ("inputs", "targets", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(rows, jax.numpy.float32, sharding=batch_sharding)

    report.update(devices=len(devices), hosts=hosts, device_kind=devices[0].device_kind,
                  mesh=dict(zip(mesh.axis_names, mesh_shape)), params=count_params(layout.abstract_state["params"]),
                  global_batch_size=config.global_batch_size, seq_len=config.seq_len,
                  grad_accum_steps=config.grad_accum_steps, remat=config.model.remat,
                  hbm_bytes=hbm_bytes(devices[0].device_kind))
    tokens_per_step = config.global_batch_size * config.seq_len
    windows = layer_windows(config.model, config.seq_len)
    model_flops = train_flops_per_token(layout.abstract_state["params"], config.model, windows, config.seq_len)
    report["model_flops_per_step"] = model_flops * tokens_per_step
    peak = peak_flops_per_device(devices[0])
    report["target_days"] = target_days
    report["target_tokens_per_sec"] = config.total_steps * tokens_per_step / (target_days * 86400)
    report["mfu_needed"] = (None if peak is None
                            else model_flops * report["target_tokens_per_sec"] / (peak * len(devices)))

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        train_step = jit_train_step(layout, optimizer, schedule, config.grad_accum_steps, batch_sharding)
        lowered = train_step.lower(layout.abstract_with_shardings(), batch)
        compiled = lowered.compile()
    report["compile_seconds"] = round(time.perf_counter() - start, 1)
    report["compiled"] = True
    report["mosaic_kernels"] = lowered.as_text().count("tpu_custom_call")

    memory = compiled.memory_analysis()
    for key, field in (("argument_bytes", "argument_size_in_bytes"), ("output_bytes", "output_size_in_bytes"),
                       ("alias_bytes", "alias_size_in_bytes"), ("temp_bytes", "temp_size_in_bytes")):
        report[key] = int(getattr(memory, field))
    # Donated state: outputs aliased to arguments occupy the same buffers.
    report["total_bytes"] = (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                             + report["temp_bytes"])
    report["fits_hbm"] = None if report["hbm_bytes"] is None else report["total_bytes"] <= report["hbm_bytes"]

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report["flops"] = float(cost.get("flops", 0.0))  # per device; XLA does not count inside the Mosaic kernels


def format_table(report: dict) -> str:
    """The report as an aligned two-column table (bytes in GiB)."""
    lines = []
    for key, value in report.items():
        if key.endswith("_bytes") and isinstance(value, int):
            value = f"{value / GIB:.3f} GiB"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{key:<24} {value}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="path to a config file defining get_config()")
    parser.add_argument("--topology", required=True, help="a TPU topology name, e.g. v5p:2x2x1, v5e:2x4, v6e:2x4")
    parser.add_argument("--target_days", type=float, default=7.0,
                        help="days in which the config's total_steps should run; sets the MFU it would need")
    args, overrides = parser.parse_known_args(argv)
    # Several processes may load libtpu at once (tests under pytest-xdist); the host side needs only the CPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")

    report = {"topology": args.topology, "compiled": False}
    code = 0
    try:
        unknown = [o for o in overrides if not o.startswith("--config.")]
        if unknown:
            raise ConfigError(f"unknown arguments {unknown}; overrides look like --config.key=value.")
        if not args.target_days > 0:
            raise ConfigError(f"--target_days={args.target_days}: must be > 0.")
        config = apply_overrides(load_config_file(args.config), overrides)
        compile_train_step(config, args.topology, args.target_days, report)
        if report["fits_hbm"] is False:  # XLA may compile a program larger than the chip's HBM without refusing it
            message = (f"the compiled step needs {report['total_bytes'] / GIB:.2f} GiB per chip, more than the "
                       f"{report['hbm_bytes'] / GIB:.0f} GiB of HBM")
            report.update(error=message, hint=_failure_hint("out of memory"))
            print(f"does not fit {args.topology}: {message}\nwhat to change: {report['hint']}", file=sys.stderr)
            code = 1
    except ConfigError as error:
        report["error"] = f"config error: {error}"
        print(report["error"], file=sys.stderr)
        code = 2
    except Exception as error:  # the compiler's refusal, whatever its type: report it with what to change
        message = f"{type(error).__name__}: {error}"
        report.update(error=message, hint=_failure_hint(message))
        print(f"compile failed for {args.topology}:\n{message}\nwhat to change: {report['hint']}", file=sys.stderr)
        code = 1
    print(format_table({key: value for key, value in report.items() if key not in ("error", "hint")}))
    print(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
