#!/usr/bin/env bash
# Everything only a GPU can show, most important first, in at most ~10 minutes on one H100/H200.
# Each part has its own time limit and writes its results as soon as it finishes, so a run cut
# off mid-script still leaves what it did. Results go to benchmarks/results/gpu-<device>/.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, in an environment with qlora-lite installed
#
# Parts: 1 doctor; 2 the 8B comparison against the PEFT stack (tokens/s, MFU, peak memory, planner,
# meter agreement); 2b one DPO step beside TRL 1.16's DPOTrainer + peft_config (8B widths, 2 and 4 layers);
# 3 a few steps of each shipped GPU recipe with paged 8-bit AdamW and a resume;
# 4 long context under a 24 GiB cap: Llama-3.1-8B shapes cut to 2 layers at 16k-128k tokens, tiled MLP
# with and without activation offload (device peak vs the planner, tokens/s, the offload's step-time cost);
# 5 the fp16 path a T4 takes (forced); 6 the notebooks in smoke mode; 7 the longest sequence each side
# trains under a 24 GiB cap (the slowest part, last).
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
device=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'no-gpu')")
out="benchmarks/results/gpu-$device"
mkdir -p "$out"
summary="$out/summary.md"
echo "# gpu_check on $device, $(date -u +%Y-%m-%dT%H:%MZ)" > "$summary"

# The whole script stays inside this budget: each part gets its own limit or what is left, if less.
budget=${GPU_CHECK_BUDGET_S:-600}

# part NAME SECONDS COMMAND...: run with a time limit, keep its output, record its exit status.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "- $name: skipped, the ${budget}s budget is spent" | tee -a "$summary"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    local status="ok"
    [ $rc -eq 124 ] && status="cut off after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
    echo "- $name: $status in $((SECONDS - start)) s (log: $name.log)" | tee -a "$summary"
}

part doctor 30 qlora-lite doctor
qlora-lite doctor --json > "$out/doctor.json" 2>/dev/null
[ "$device" = "no-gpu" ] && { echo "no CUDA GPU: only the doctor part ran" | tee -a "$summary"; exit 1; }

part throughput-8b 170 python benchmarks/throughput.py --arch llama8b --seq 512,2048,8192 --micro-batch 1 --steps 2 --warmup 1 --out "$out"
part memory-meter-8b 80 python benchmarks/memory_compare.py --layers 2 4 --out "$out"
# One DPO step beside TRL's DPOTrainer (its Triton fused head runs only here): the CPU meter's 0.39x is partly TRL's CPU fallback.
part preference-memory 120 python benchmarks/preference_memory.py --layers 2 4 --name llama8b --out "$out"
# FSDP2 loading layer by layer at Llama-3.1-70B widths (2 layers) on 2 GPUs (nccl): torch.cuda's peak per GPU while loading and in one step, vs the planner.
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    part fsdp-load-70b 150 python benchmarks/fsdp_loading.py --layers 2 --paths layerwise --threads 4 --work /tmp/fsdp-load-gpu --out "$out"
else
    echo "- fsdp-load-70b: skipped: one GPU" | tee -a "$summary"
fi
part recipes 90 python benchmarks/recipe_smoke.py --layers 2 --out "$out"
# 2 layers, not 32 (writing and quantizing 32 random layers would take the whole budget): the per-token device
# bytes, the host copies and the step times are the GPU truth; 32 layers are extrapolated as on the CPU.
part long-context 200 python benchmarks/long_context.py --layers 2 --seq 16384 32768 65536 131072 --sides tiled offload \
    --timed-steps 2 --cap-gib 24 --name llama8b-2layers-24gib --work /tmp/long-context-gpu --out "$out"
part fp16-t4-path 45 qlora-lite train recipes/tiny-demo.yaml quant.compute_dtype=float16 train.mixed_precision=fp16 \
    "output_dir=$out/fp16-run" --overwrite
part notebooks 60 python -m pytest -q -p no:cacheprovider tests/test_notebooks.py
part longest-24gib 120 python benchmarks/throughput.py --arch llama8b --seq 2048 --micro-batch 1 --steps 1 --warmup 1 --longest --out "$out"
echo "done in $SECONDS s; results in $out" | tee -a "$summary"
