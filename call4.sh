F() { grep -v -E "^(WARNING|I0000|E0000|W0000)|absl|cuda_|xla_bridge|TfrtCpu|jax._src" ; }
python3 -m bench.bench_kernels --skip-check --reps 20 --sweep none --profile --top 12 --shapes S2,S1 --impls pallas_triton,pallas_scan 2>&1 | F | tee $OUT/kscan.txt
M=nha_340m,transformer_340m,nha_340m@model.remat=dots_and_attention,transformer_340m@model.remat=dots_and_attention
python3 bench/bench_train.py --jobs 4 --seq-lens 8192 --models $M --out $OUT/train8k.jsonl 2>&1 | F | tee $OUT/t8k.txt
