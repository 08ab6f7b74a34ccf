"""Latency-aware compression (`--target latency`): meet a measured latency budget on the deployment target.

    request = resolve_request("latency", 0.5, "cuda", 1, None, None)   # validated options
    planned = plan_for_latency(analysis, "l1", plan_options, request)   # profile (cached), allocate -> Plan
    check = check_latency(analysis.proto, compressed, planned, request) # measured vs predicted

Modules: micro (cost items, micro-models, layer signatures), cache (on-disk table), table (profiling, alignment,
calibration), loop_budget (the table's part of --profile-budget), importance (method scores made comparable), allocate (the knapsack), planner (the closed loop),
result (LatencyPlan), paired (side-by-side measurement), check (predicted vs measured), timed (models converted to
the request's precision, fp16 or int8, before they are timed).
"""

from compressor.latency.check import check_latency, flag_note
from compressor.latency.planner import LATENCY_OPTIONS, plan_for_latency
from compressor.latency.result import LatencyPlan
from compressor.latency.request import LATENCY_TARGET, LatencyRequest, ProfileSettings, resolve_request

__all__ = ["LATENCY_OPTIONS", "LATENCY_TARGET", "LatencyPlan", "LatencyRequest", "ProfileSettings", "check_latency", "flag_note",
           "plan_for_latency", "resolve_request"]
