"""train.py under jax.distributed: two processes on localhost (4 fake CPU devices each, gloo collectives) train the
default config with FSDP x tensor parallelism over all 8 devices; both report the losses of a one-process run on 8
devices, and their jointly written checkpoint resumes in one process to the losses of the run that never stopped."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train.py and configs/ live at the repo root, outside the installed package

import train as train_cli  # noqa: E402
from nha_jax.training import apply_overrides, load_config_file, train  # noqa: E402
from nha_testing import persistent_compilation_cache  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "default.py"
PROCESSES, DEVICES_PER_PROCESS = 2, 4
# The default config shrunk for CI (one layer: window 8 plus 8 slots; 8 x 64 byte rows); the mesh puts
# fsdp across the two processes, so each one holds and checkpoints only its shards of the state. The naive operator
# compiles in half the time of the chunked one and does not change what is tested here.
OVERRIDES = [
    "--config.seq_len=64", "--config.global_batch_size=8", "--config.log_every=1", "--config.eval_every=0",
    "--config.diagnostic_every=0", "--config.checkpoint_every=0", "--config.progress_bar=false",
    "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
    "--config.model.d_model=64", "--config.model.num_layers=1", "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.v_head_dim=16",
    "--config.model.mlp_hidden=128", "--config.model.num_slots=8", "--config.model.window=8",
    "--config.model.block_size=0", "--config.model.attention_impl=naive",
]
# Runs train.py's own main() with --distributed; only wraps the trainer to print this process's summary, which the
# CLI prints for process 0 alone.
WORKER = """
import json, sys
import jax
import nha_jax.training
import train
real_train = nha_jax.training.train
def train_and_report(config):
    summary = real_train(config)
    print("SUMMARY " + json.dumps({"process": jax.process_index(), **summary}), flush=True)
    return summary
nha_jax.training.train = train_and_report
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The two in-process runs compile the same programs: a persistent cache makes the second one cheap."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")):
        yield


def free_port() -> int:
    """A TCP port free on localhost right now (for the coordinator)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def launch_distributed(workdir: Path, total_steps: int) -> list[dict]:
    """Runs train.py as PROCESSES processes on localhost; returns each process's summary, by process index."""
    address = f"localhost:{free_port()}"
    # Optimization level 0 compiles 2-3x faster on the CPU; the float32 results agree to rounding.
    xla_flags = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS} --xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest", "XLA_FLAGS": xla_flags}
    arguments = ["--config", str(DEFAULT_CONFIG), f"--config.workdir={workdir}", f"--config.total_steps={total_steps}",
                 *OVERRIDES, "--distributed", f"--coordinator_address={address}", f"--num_processes={PROCESSES}"]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, *arguments, f"--process_id={index}"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(PROCESSES)]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=300))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    summaries = []
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
        summaries += [json.loads(line[len("SUMMARY "):]) for line in stdout.splitlines() if line.startswith("SUMMARY ")]
    return sorted(summaries, key=lambda summary: summary["process"])


def one_process_run(workdir: Path, total_steps: int) -> dict:
    """The same config in this process, over its 8 fake devices (conftest): the same global mesh, one host."""
    assert jax.device_count() == PROCESSES * DEVICES_PER_PROCESS
    config = apply_overrides(load_config_file(str(DEFAULT_CONFIG)),
                             [*OVERRIDES, f"--config.workdir={workdir}", f"--config.total_steps={total_steps}"])
    return train(config)


def logged_losses(workdir: Path) -> dict[int, float]:
    """step -> loss from process 0's metrics.jsonl."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def test_two_processes_agree_with_one_and_their_checkpoint_resumes(tmp_path):
    shared, straight = tmp_path / "shared_workdir", tmp_path / "one_process"
    summaries = launch_distributed(shared, total_steps=2)
    reference = one_process_run(straight, total_steps=3)
    reference_losses = logged_losses(straight)

    assert [summary["process"] for summary in summaries] == [0, 1]
    for summary in summaries:  # every process sees the global loss of the one-process run
        assert summary["final_step"] == 2
        np.testing.assert_allclose([summary["first_loss"], summary["final_loss"]],
                                   [reference_losses[1], reference_losses[2]], rtol=1e-5)

    resumed = one_process_run(shared, total_steps=3)  # restores the state both processes wrote, shard by shard
    assert resumed["steps_run"] == 1
    np.testing.assert_allclose(resumed["final_loss"], reference["final_loss"], rtol=1e-5)
    assert logged_losses(shared).keys() == {1, 2, 3}


def test_cluster_flags_without_distributed_exit_2(capsys):
    code = train_cli.main(["--config", str(DEFAULT_CONFIG), "--num_processes=2"])
    assert code == 2
    assert "--num_processes needs --distributed" in capsys.readouterr().err
