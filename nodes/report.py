"""Pruning Report: what Apply Pruned Mask removed, as text and a per-block chart."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..ecodiff_comfy.images import kept_chart
from .common import CATEGORY, ReportData, ReportType


def chart_rows(data: ReportData) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    rows: dict[str, dict[str, list[int]]] = {}
    for name, (kept, total) in data.keep_counts.items():
        stats = rows.setdefault(data.blocks[name] or name, {}).setdefault(data.kinds[name], [0, 0])
        stats[0] += kept
        stats[1] += total
    return [(block, {k: (v[0], v[1]) for k, v in kinds.items()}) for block, kinds in rows.items()]


class PruningReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EcoDiffPruningReport",
            display_name="Pruning Report (EcoDiff)",
            category=CATEGORY,
            description="Parameters before/after, per unit kind and per block, and a chart of kept units per block.",
            inputs=[ReportType.Input("report", tooltip="The report output of Apply Pruned Mask.")],
            outputs=[
                io.String.Output(display_name="text", tooltip="The report as a text table."),
                io.Image.Output(display_name="chart", tooltip="Bar chart of kept heads/neurons/channels per block."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, report: ReportData) -> io.NodeOutput:
        text = ("".join(f"WARNING: {w}\n" for w in report.warnings)
                + f"mode: {report.mode}; target: {report.target}\n" + report.report.to_text())
        chart = kept_chart(chart_rows(report), f"{report.report.arch}: kept units per block ({report.mode})")
        return io.NodeOutput(text, chart, ui={"text": (text,), **ui.PreviewImage(chart, cls=cls).as_dict()})
