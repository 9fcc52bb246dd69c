#!/usr/bin/env bash
# Nsight Compute counters of the NHA Pallas kernels in one forward+backward (bench_kernels --once) at S1.
# Usage (GPU machine, repo root, PYTHONPATH set): [KERNELS=regex] bash bench/ncu_kernels.sh OUT_DIR DIMS [extra args]
# DIMS as bench_kernels --dims: 16,16,128,64,64 (the issue's S1 layer) or 16,4,64,64,32 (NHA-340M's). KERNELS picks
# the kernels (default: every NHA kernel, over 200 s of ncu at NHA-340M's dims; e.g. KERNELS=nha_output_backward).
# XLA's command buffers (CUDA graphs) are off and its memory is not preallocated: with them, ncu's replay ran out of
# memory instantiating a graph or segfaulted (H100, jax 0.11.2, 2026-11-27).
# Writes OUT_DIR/ncu_<dims>.txt in full and prints per kernel: time, registers, shared memory, occupancy and its
# limiters, local-memory (spill) instructions, and the warp stall reasons (cycles per issued instruction).
set -u
out=$1; dims=$2; shift 2
log="$out/ncu_${dims//,/_}.txt"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" XLA_PYTHON_CLIENT_PREALLOCATE=false \
timeout 300 ncu --clock-control none --kernel-name "regex:${KERNELS:-nha}" --launch-count 10 \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
  --metrics smsp__sass_inst_executed_op_local_ld.sum,smsp__sass_inst_executed_op_local_st.sum,smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio \
  python3 -m bench.bench_kernels --once --shapes S1 --dims "$dims" "$@" > "$log" 2>&1
echo "== ncu dims $dims (rc $?)"
grep -E '^  nha|Duration|Registers Per Thread|Shared Memory Per Block|Theoretical Occupancy|Achieved Occupancy|Block Limit (Registers|Shared Mem)|Warp Cycles Per Issued|local_(ld|st)|inst_executed.sum|dram__bytes|hmma|Memory Throughput|Compute \(SM\) Throughput' "$log"
# the stall reasons worth over 0.5 cycles per issued instruction
awk '/^  nha/{print} /issue_stalled/ && $NF+0 > 0.5 {sub(/smsp__average_warps_issue_stalled_/,""); sub(/_per_issue_active.ratio/,""); print "   ", $1, $NF}' "$log"
