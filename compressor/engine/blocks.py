"""Residual blocks: branches that rejoin their own input through an identity skip (Add/Sum) and can be dropped."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.engine.graph import GraphView

MAX_BRANCH_NODES = 400


@dataclass
class Block:
    """A removable residual branch: dropping it makes the join's output equal to `skip`."""

    index: int
    name: str
    join: str
    skip: str
    branch_output: str
    nodes: list[str]
    macs: int = 0
    zero: bool = False


def find_blocks(view: GraphView, cmaps: dict) -> list[Block]:
    """Every Add/Sum whose one input is an ancestor-only branch of the other (identity skip, same shape)."""
    from compressor.engine.cost import node_macs

    blocks: list[Block] = []
    for node in view.nodes:
        if node.op_type not in ("Add", "Sum") or len(node.input) != 2:
            continue
        a, b = node.input
        for skip, branch in ((a, b), (b, a)):
            if skip == branch or view.const(skip) is not None or view.const(branch) is not None:
                continue
            if view.shape(skip) is None or view.shape(skip) != view.shape(branch) or view.shape(skip) != view.shape(node.output[0]):
                continue
            members = _branch_nodes(view, skip, branch, node)
            if members is None:
                continue
            cmap = cmaps.get(branch)
            zero = bool(cmap is not None and cmap.zero.all())
            names = [n.name for n in view.nodes if n.name in members]
            macs = sum(node_macs(n, view) for n in view.nodes if n.name in members)
            blocks.append(Block(len(blocks), names[-1] if names else node.name, node.name, skip, branch, names, macs, zero))
            break
    return blocks


def _branch_nodes(view: GraphView, skip: str, branch: str, join) -> set[str] | None:
    """Nodes computing `branch` from `skip` and constants alone, used nowhere else; None if there are none."""
    members: set[str] = set()
    stack = [branch]
    seen_tensors = {branch}
    while stack:
        tensor = stack.pop()
        if tensor == skip or view.const(tensor) is not None:
            continue
        producer = view.producer.get(tensor)
        if producer is None or len(members) > MAX_BRANCH_NODES:
            return None
        if producer.name in members:
            continue
        members.add(producer.name)
        for inp in producer.input:
            if inp and inp not in seen_tensors:
                seen_tensors.add(inp)
                stack.append(inp)
    if not members or not _reads(view, members, skip):
        return None
    for name in members:
        for out in view.by_name[name].output:
            if out in view.outputs:
                return None
            for consumer in view.consumers.get(out, []):
                if consumer.name not in members and not (consumer is join and out == branch):
                    return None
    return members


def _reads(view: GraphView, members: set[str], tensor: str) -> bool:
    return any(c.name in members for c in view.consumers.get(tensor, []))

