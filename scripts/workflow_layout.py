"""Where the nodes of a UI-format workflow lie on the canvas: bounding boxes and overlaps.

LiteGraph draws a node's title bar above ``pos`` (``pos`` is the top-left corner of the body), so a
node covers ``[x, y - TITLE_HEIGHT, width, height + TITLE_HEIGHT]`` (``LGraphNode.getBounding``);
a collapsed node is a title bar only.  Used by tests/unit/test_example_workflows.py and
scripts/make_example_workflows.py; the browser test checks the same on the frontend's own bounds.
"""
from __future__ import annotations

from itertools import combinations

TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT
COLLAPSED_WIDTH = 80


def node_box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of one node, title bar included, in canvas units."""
    x, y = (float(v) for v in node["pos"][:2])
    width, height = (float(v) for v in node["size"][:2])
    if (node.get("flags") or {}).get("collapsed"):
        return x, y - TITLE_HEIGHT, x + COLLAPSED_WIDTH, y
    return x, y - TITLE_HEIGHT, x + width, y + height


def overlap_area(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    dx = min(a[2], b[2]) - max(a[0], b[0])
    dy = min(a[3], b[3]) - max(a[1], b[1])
    return dx * dy if dx > 0 and dy > 0 else 0.0


def overlaps(wf: dict) -> list[str]:
    """Every pair of nodes whose boxes intersect, as readable lines (empty when the layout is clean)."""
    boxes = [(n, node_box(n)) for n in wf.get("nodes", [])]
    out = []
    for (n1, b1), (n2, b2) in combinations(boxes, 2):
        area = overlap_area(b1, b2)
        if area > 0:
            out.append(f"{n1['type']} #{n1['id']} {tuple(round(v) for v in b1)} overlaps "
                       f"{n2['type']} #{n2['id']} {tuple(round(v) for v in b2)} ({area:.0f} px²)")
    return out
