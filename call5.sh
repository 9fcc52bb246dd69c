F() { grep -v -E "^(WARNING|I0000|E0000|W0000)|absl|cuda_|xla_bridge|TfrtCpu|jax._src" ; }
python3 -m bench.bench_kernels --skip-check --reps 30 --sweep none --shapes S1,S2,S3 --impls pallas_triton,cudnn_causal 2>&1 | F | tee $OUT/k.txt
