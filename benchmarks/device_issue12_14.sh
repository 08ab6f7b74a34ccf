#!/bin/bash
# One device session for issues 12 and 14 on nvidia-h200-x2, started detached (setsid) by the first work call so
# that it runs on between calls while the machine is held; later calls only watch it and copy results to $OUT.
#
#   GPU 0: two strong baselines at once (the recipe with our OneCycle, and with torch's OneCycleLR, which cycles the
#          momentum); the one with the better validation top-1 (the 5,000 held-out train images) is the teacher and
#          starting point of every row. Then the issue-12 rows R0 from it.
#   GPU 1: the issue-14 ResNet-50 ship driver's CUDA cells, then the issue-12 rows R1 (latency-aware rows first,
#          each alone until its plan is made).
#   Then, both GPUs quiet: every slim ONNX timed in one pass (stage B --rows none), the table and the plot; last, the
#   ship driver's int8 CPU cells on the quiet host (pinned to cores 16-31; under load CPU timings move by 45%).
#
# Usage (on the device, repository root): ROWS_UNTIL=<epoch seconds> bash benchmarks/device_issue12_14.sh
# ROWS_UNTIL: when the rows must have finished (the timing, the CPU cells and packing take about 3 minutes after it).
# Rows NAME@N are seed replicates (compress train --seed N; the held-out validation images stay the same).
set -u
source .device/base/setup.sh
ROWS_UNTIL=${ROWS_UNTIL:?set ROWS_UNTIL}
EPOCHS=${EPOCHS:-60}
RECIPE=${RECIPE:-onecycle}
R0=${R0:-amsc-reverse-kd,l1-kd-ramp,gsm-kd,gsm-kd@1,gsm-kd@2,baseline-ft,baseline-ft@1,baseline-ft-kd,baseline-ft-kd@1,amsc-depth-kd,amsc-kd,amsc-width-kd,l1-kd,amsc-share50-kd}
R1=${R1:-latency-b128-calib-kd,latency-b128-calib-kd-ramp,latency-b128-calib-kd@1,latency-b128-calib-kd@2,latency-b128-calib-kd-e120,graph-rw-data-kd,graph-rw-kd,amsc-uniform-kd,l1,gsm,amsc-depth,gsm-kd-e120,baseline-ft-e120}
ACC="python3 benchmarks/accuracy_at_speed.py"
left() { echo $(( ROWS_UNTIL - $(date +%s) )); }
say() { echo "[$(date +%H:%M:%S)] $*"; }

say "two baselines on GPU 0, ship driver on GPU 1"
for variant in onecycle onecycle-torch; do
    cores=$([ "$variant" = onecycle ] && echo 0-7 || echo 8-15)
    CUDA_VISIBLE_DEVICES=0 taskset -c "$cores" $ACC stage-a --data .device/base/data --models .device/base/models \
        --rows none --baseline-schedule "$variant" --out "/tmp/acc-$variant" --work "/tmp/accw-$variant" \
        --time-limit 900 > "/tmp/acc-$variant.stdout" 2>&1 &
done
CUDA_VISIBLE_DEVICES=1 taskset -c 16-31 python3 benchmarks/ship_resnet50.py --out /tmp/ship --work /tmp/ship50 \
    --targets cuda@1,cuda@32 --cpu-cores 16-31 --time-limit 400 > /tmp/ship.stdout 2>&1
say "ship driver, CUDA cells, finished (exit $?)"
wait
BEST=$(python3 - <<'EOF'
import json
val = {}
for v in ("onecycle", "onecycle-torch"):
    try:
        rows = json.load(open(f"/tmp/acc-{v}/rows_a.json"))["rows"]
        val[v] = next(r["val_top1"] for r in rows if r["name"] == "baseline")
    except Exception as exc:
        print(f"# {v}: {exc}", file=open("/tmp/choice.txt", "a"))
print(max(val, key=lambda v: val[v]) if val else "none")
print(f"validation top-1 of the baselines: {val}", file=open("/tmp/choice.txt", "a"))
EOF
)
say "baselines: $(cat /tmp/choice.txt | tr '\n' ' '); chosen: $BEST"
A=/tmp/acc-$BEST
[ -f "$A/baseline.pt" ] || { say "no baseline: stop"; touch /tmp/orch.done; exit 1; }
cp "$A/baseline.pt" /tmp/baseline.pt  # bring it back through $OUT: a later call's rows can start from the same checkpoint
CUDA_VISIBLE_DEVICES=0 taskset -c 0-15 $ACC stage-a --data .device/base/data --baseline "$A/baseline.pt" \
    --epochs "$EPOCHS" --recipe "$RECIPE" --rows "$R0" --out /tmp/accB0 --work /tmp/accwB0 --time-limit "$(left)" \
    > /tmp/accB0.stdout 2>&1 &
P0=$!
CUDA_VISIBLE_DEVICES=1 taskset -c 16-31 $ACC stage-a --data .device/base/data --baseline "$A/baseline.pt" \
    --epochs "$EPOCHS" --recipe "$RECIPE" --plan-latency --rows "$R1" --out /tmp/accB1 --work /tmp/accwB1 \
    --time-limit "$(left)" > /tmp/accB1.stdout 2>&1 &
P1=$!
wait $P0 $P1
say "rows finished; timing"
CUDA_VISIBLE_DEVICES=0 $ACC stage-b --data .device/base/data --from "$A,/tmp/accB0,/tmp/accB1" --rows none \
    --epochs "$EPOCHS" --recipe "$RECIPE" --out /tmp/accF --work /tmp/accwF --time-limit 300 --latency-reserve 300 \
    > /tmp/accF.stdout 2>&1
say "timing done (exit $?); ship driver, CPU cells, on the quiet host"
python3 benchmarks/ship_resnet50.py --out /tmp/ship_cpu --work /tmp/ship50cpu --targets cpu:1,cpu:4 --cpu-cores 16-31 \
    --time-limit 200 > /tmp/ship_cpu.stdout 2>&1
say "done (exit $?)"
touch /tmp/orch.done
