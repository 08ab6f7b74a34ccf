"""Which nodes a user's pattern names: node names and the initializers they read, glob or substring."""

from __future__ import annotations

import fnmatch

import onnx


def name_matches(name: str, pattern: str) -> bool:
    """Glob match when the pattern has wildcards, else substring match (the --exclude convention)."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def matching_nodes(proto: onnx.ModelProto, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the nodes whose name, or the name of an initializer they read, matches one of `patterns`."""
    if not patterns:
        return []
    initializers = {init.name for init in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        names = [node.name] + [i for i in node.input if i in initializers]
        if node.name and any(name_matches(n, p) for n in names for p in patterns):
            found.append(node.name)
    return found
