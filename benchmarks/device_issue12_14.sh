#!/bin/bash
# One device session for issues 12 and 14 on nvidia-h200-x2, started detached (setsid) by the first work call so
# that it runs on between calls while the machine is held; later calls only watch it and copy results to $OUT.
#
#   GPU 0: the strong baseline (stage A, alone), then the issue-12 rows R0 from it.
#   GPU 1: the issue-14 ResNet-50 ship driver (CPU timing pinned to cores 16-31), then the issue-12 rows R1
#          (latency-aware rows first, each alone until its plan is made).
#   Then, both GPUs quiet: every slim ONNX timed in one pass (stage B --rows none), the table and the plot.
#
# Usage (on the device, repository root): ROWS_UNTIL=<epoch seconds> bash benchmarks/device_issue12_14.sh
# ROWS_UNTIL: when the rows must have finished (the timing and packing take about 2 minutes after it).
set -u
source .device/base/setup.sh
ROWS_UNTIL=${ROWS_UNTIL:?set ROWS_UNTIL}
EPOCHS=${EPOCHS:-60}
R0=${R0:-amsc-kd,gsm-kd,baseline-ft,calib-l1-kd,amsc-depth-kd,l1-kd,gsm-kd-onecycle,graph-rw-norm-kd,amsc-width-kd,amsc-reverse-kd,gsm-kd-e120,amsc-share50-kd}
R1=${R1:-latency-b128-calib-kd,latency-b128-kd,amsc-uniform-kd,baseline-ft-kd,gsm,amsc-depth,l1,graph-rw-kd,graph-rw-data-kd,baseline-ft-e120,graph-rw-norm,graph-rw}
ACC="python3 benchmarks/accuracy_at_speed.py"
left() { echo $(( ROWS_UNTIL - $(date +%s) )); }
say() { echo "[$(date +%H:%M:%S)] $*"; }

say "baseline on GPU 0, ship driver on GPU 1"
CUDA_VISIBLE_DEVICES=0 taskset -c 0-7 $ACC stage-a --data .device/base/data --models .device/base/models --rows none \
    --out /tmp/accA --work /tmp/accwA --time-limit 620 > /tmp/accA.stdout 2>&1 &
PA=$!
CUDA_VISIBLE_DEVICES=1 taskset -c 16-31 python3 benchmarks/ship_resnet50.py --out /tmp/ship --work /tmp/ship50 \
    --cpu-cores 16-31 --time-limit 540 > /tmp/ship.stdout 2>&1 &
PS=$!
wait $PA
say "baseline finished: $(tail -1 /tmp/accA/log_a.txt)"
[ -f /tmp/accA/baseline.pt ] || { say "no baseline: stop"; touch /tmp/orch.done; exit 1; }
CUDA_VISIBLE_DEVICES=0 taskset -c 0-15 $ACC stage-a --data .device/base/data --baseline /tmp/accA/baseline.pt \
    --epochs "$EPOCHS" --rows "$R0" --out /tmp/accB0 --work /tmp/accwB0 --time-limit "$(left)" > /tmp/accB0.stdout 2>&1 &
P0=$!
wait $PS
say "ship driver finished (exit $?)"
CUDA_VISIBLE_DEVICES=1 taskset -c 16-31 $ACC stage-a --data .device/base/data --baseline /tmp/accA/baseline.pt \
    --epochs "$EPOCHS" --plan-latency --rows "$R1" --out /tmp/accB1 --work /tmp/accwB1 --time-limit "$(left)" \
    > /tmp/accB1.stdout 2>&1 &
P1=$!
wait $P0 $P1
say "rows finished; timing"
CUDA_VISIBLE_DEVICES=0 $ACC stage-b --data .device/base/data --from /tmp/accA,/tmp/accB0,/tmp/accB1 --rows none \
    --epochs "$EPOCHS" --out /tmp/accF --work /tmp/accwF --time-limit 300 --latency-reserve 300 > /tmp/accF.stdout 2>&1
say "done (exit $?)"
touch /tmp/orch.done
