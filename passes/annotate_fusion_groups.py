"""Record the Conv + activation (+ pool) fusion groups for the TVM back end (an analysis).

The groups (:func:`graphopt.algorithms.tvm.fusion.find_groups`) are written as a JSON list of lists
of node names into ``model.metadata['graphopt.fusion_groups']``; the graph itself stays as it is,
except that a node of a group without a name gets a unique one. Only the compile job runs this
pass: a portable ``optimize`` output carries no TVM metadata. Stats: ``groups``, ``with_pool``.
"""

from __future__ import annotations

import json

from graphopt.algorithms.tvm.fusion import METADATA_KEY, POOLS, find_groups
from graphopt.core.graph import unique_name
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass


@register_pass
class AnnotateFusionGroupsPass(Pass):
    """Record Conv+activation(+pool) groups in metadata for the TVM back end (graph unchanged)."""

    name = "annotate-fusion-groups"

    def call(self, model: Model) -> PassResult:
        modified = False
        groups: list[list[str]] = []
        with_pool = 0
        for g in model.walk_graphs():
            for group in find_groups(g):
                for n in group:
                    if not n.name:
                        n.name = unique_name(n.op.lower())
                        modified = True
                groups.append([n.name for n in group])
                with_pool += group[-1].op in POOLS
        value = json.dumps(groups, separators=(",", ":"))
        if groups and model.metadata.get(METADATA_KEY) != value:
            model.metadata[METADATA_KEY] = value
            modified = True
        elif not groups and METADATA_KEY in model.metadata:
            del model.metadata[METADATA_KEY]
            modified = True
        return PassResult(model, modified, {"groups": len(groups), "with_pool": with_pool})
