#!/usr/bin/env bash
# Nsight Compute counters of the NHA Pallas kernels in one forward+backward (bench_kernels --once) at S1.
# Usage (GPU machine, repo root, PYTHONPATH set): bash bench/ncu_kernels.sh OUT_DIR DIMS [extra bench_kernels args]
# DIMS as bench_kernels --dims: 16,16,128,64,64 (the issue's S1 layer) or 16,4,64,64,32 (NHA-340M's).
# Writes OUT_DIR/ncu_<dims>.txt in full and prints per kernel: time, registers, shared memory, occupancy and its
# limiters, local-memory (spill) instructions, and the warp stall reasons (cycles per issued instruction).
set -u
out=$1; dims=$2; shift 2
log="$out/ncu_${dims//,/_}.txt"
timeout 200 ncu --clock-control none --kernel-name regex:nha --launch-count 10 \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
  --metrics smsp__sass_inst_executed_op_local_ld.sum,smsp__sass_inst_executed_op_local_st.sum,smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio \
  python3 -m bench.bench_kernels --once --shapes S1 --dims "$dims" "$@" > "$log" 2>&1
echo "== ncu dims $dims (rc $?)"
grep -E '^  nha|Duration|Registers Per Thread|Shared Memory Per Block|Theoretical Occupancy|Achieved Occupancy|Block Limit (Registers|Shared Mem)|Warp Cycles Per Issued|local_(ld|st)|inst_executed.sum|dram__bytes|Memory Throughput|Compute \(SM\) Throughput' "$log"
# the stall reasons worth over 0.5 cycles per issued instruction
awk '/^  nha/{print} /issue_stalled/ && $NF+0 > 0.5 {sub(/smsp__average_warps_issue_stalled_/,""); sub(/_per_issue_active.ratio/,""); print "   ", $1, $NF}' "$log"
