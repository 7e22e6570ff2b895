#!/usr/bin/env bash
# Issue 15's GPU checks as one prepared script, for a machine with a CUDA GPU (the `device` tool's `run`):
#   digits and a TextCaps-fixture fine-tuning run (resnet_visual + char_cnn_text, differential LRs, the image cache,
#   augmentation) in float32 and with bf16 autocast; the step-overhead table at batch 128 and 1024; the image
#   pipeline; the fit's eigenproblem on the device against the host round trip (gaussian.symmetric_eigh's choice),
#   and the fit's two routes with either (gaussian.gram_route's choice).
#
#   bash bench/gpu_check.sh                       # figures in $OUT/gpu_check.log (outputs/gpu_check/ without $OUT)
#   DEVICE=cpu QUICK=1 bash bench/gpu_check.sh    # the same steps, small, on a CPU: checks the script itself
#
# PY (default python3: on the lent machine, the one that holds PyTorch) runs tdro from this checkout (PYTHONPATH).
# The fixture needs the real TextCaps annotation samples: TEXTCAPS_SOURCE (default ../shared/data/textcaps; the
# device tool does not carry ../shared, so copy that folder into an ignored folder of the repo, carry it and point
# TEXTCAPS_SOURCE there). A step that fails is logged with its exit status and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
export TEXTCAPS_SOURCE=${TEXTCAPS_SOURCE:-$PWD/../shared/data/textcaps}  # tests/textcaps_fixture.py reads it
out=${OUT:-outputs/gpu_check}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
log=$out/gpu_check.log
: >"$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=agg
if [ "$QUICK" = 1 ]; then
    epochs=1 rounds=2 settings="64:10" batches="64" images=32 steps=1 textcaps_records=32 image_size=64
else
    epochs=10 rounds=15 settings="64:10 128:10 256:10 256:20 256:100 512:10" batches="64 512" images=512 steps=5
    textcaps_records=512 image_size=224
fi
bf16_modes="false"
[ "${DEVICE%%:*}" = cuda ] && bf16_modes="false true"

step() {  # step TITLE COMMAND...: run it, its output into the log, its exit status after it
    echo "== $1" | tee -a "$log"
    shift
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$log"
    echo "== exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

step "machine" "$PY" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, 'MiB')"
command -v nvidia-smi >/dev/null && step "nvidia-smi" nvidia-smi

for bf16 in $bf16_modes; do
    step "digits on $DEVICE, bf16 $bf16" "$PY" -m tdro train -p device "$DEVICE" -p bf16 "$bf16" -p epochs "$epochs" \
        -p progress false -p output_dir "$work/runs" -p run_name "digits-bf16-$bf16"
done

step "TextCaps fixture ($textcaps_records + $textcaps_records records, real image sizes)" "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from textcaps_fixture import make_textcaps
make_textcaps('$work/textcaps', $textcaps_records, $textcaps_records)
print('written', '$work/textcaps')"
for bf16 in $bf16_modes; do
    step "seed_baseline fine-tuning on the fixture, $DEVICE, bf16 $bf16" "$PY" -m tdro train \
        -f params/seed_baseline.yaml -p data_root "$work/textcaps" -p feature_cache_dir "$work/cache" \
        -p device "$DEVICE" -p bf16 "$bf16" -p epochs "$epochs" -p image_size "$image_size" -p image_cache true \
        -p augment true -p num_workers 4 -p progress false -p output_dir "$work/runs" -p run_name "textcaps-bf16-$bf16"
done

for batch in $batches; do
    # shellcheck disable=SC2086 # the settings are separate arguments
    step "step overhead on $DEVICE, batch $((2 * batch))" "$PY" bench/step_overhead.py --device "$DEVICE" \
        --group-batch "$batch" --rounds "$rounds" --settings $settings
done
step "image pipeline on $DEVICE" "$PY" bench/image_pipeline.py --device "$DEVICE" --images "$images" \
    --steps "$steps" --threads 4 --workers 4
step "the fit's eigenproblem: $DEVICE against the host" "$PY" bench/eigh_floor.py --repeats $((rounds * 10))
step "the fit's n×n and k×k routes on $DEVICE, eigh on the device and on the host" "$PY" bench/fit_routes.py \
    --device "$DEVICE" --repeats "$rounds"
echo "log: $log"
