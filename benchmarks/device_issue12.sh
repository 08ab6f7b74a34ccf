#!/bin/bash
# One issue-12 device session on ONE GPU (nvidia-h100-x1 or nvidia-h200), started detached (setsid) by the first work
# call so that it runs on between calls while the machine is held; later calls only watch it and copy results to $OUT.
#
#   1. Two baselines at once (CUDA MPS; two ran as fast as one on an H200): the rows' baseline (torch's OneCycleLR,
#      5,000 train images held out, as in every row) and, for the ">= 90.9" aim only, the recipe on the whole
#      train set (--baseline-val-size 0; no row starts from it: its rows would judge on images it trained on).
#   2. The rows R from the rows' baseline, in the same driver (latency-aware rows first, each alone until its plan is
#      made), as many as fit before ROWS_UNTIL.
#   3. Every slim ONNX timed in one pass (stage B --rows none), the table and the plot.
#
# Usage (on the device, repository root): ROWS_UNTIL=<epoch seconds> bash benchmarks/device_issue12.sh
# ROWS_UNTIL: when the rows must have finished (timing and packing take about 2 minutes after it).
# Rows NAME@N are seed replicates (compress train --seed N; the held-out validation images stay the same).
set -u
source .device/base/setup.sh
ROWS_UNTIL=${ROWS_UNTIL:?set ROWS_UNTIL}
EPOCHS=${EPOCHS:-60}
RECIPE=${RECIPE:-onecycle}
R=${R:-latency-b128-calib-kd,latency-b128-calib-kd@1,amsc-reverse-kd,amsc-kd,amsc-uniform-kd,gsm-kd,gsm-kd@1,baseline-ft,baseline-ft-kd,amsc-depth-kd,amsc-width-kd,l1-kd,graph-rw-data-kd,graph-rw-kd,latency-b128-calib-kd-ramp,l1-kd-ramp,baseline-ft@1,gsm-kd@2,latency-b128-calib-kd@2}
ACC="python3 benchmarks/accuracy_at_speed.py"
say() { echo "[$(date +%H:%M:%S)] $*"; }

say "the issue's recipe on the whole train set (background); the rows' baseline, then the rows"
taskset -c 12-15 $ACC stage-a --data .device/base/data --models .device/base/models --rows none \
    --baseline-schedule onecycle-torch --baseline-val-size 0 --out /tmp/acc-full --work /tmp/accw-full \
    --time-limit 900 > /tmp/acc-full.stdout 2>&1 &
FULL=$!
taskset -c 0-11 $ACC stage-a --data .device/base/data --models .device/base/models --baseline-schedule onecycle-torch \
    --epochs "$EPOCHS" --recipe "$RECIPE" --plan-latency --rows "$R" --out /tmp/acc --work /tmp/accw \
    --time-limit "$(( ROWS_UNTIL - $(date +%s) ))" > /tmp/acc.stdout 2>&1
say "rows finished (exit $?)"
wait $FULL
say "whole-train-set baseline finished (exit $?)"
cp /tmp/acc/baseline.pt /tmp/baseline.pt 2>/dev/null  # for a later call's rows (same checkpoint)
$ACC stage-b --data .device/base/data --from /tmp/acc --rows none --epochs "$EPOCHS" --recipe "$RECIPE" \
    --out /tmp/accF --work /tmp/accwF --time-limit 240 --latency-reserve 240 > /tmp/accF.stdout 2>&1
say "timing done (exit $?)"
touch /tmp/orch.done
