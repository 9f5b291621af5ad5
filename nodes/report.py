"""Pruning Report: what Apply Pruned Mask removed, as text and a per-block chart."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..ecodiff_comfy.images import kept_chart
from .common import ReportData, ReportType, node_schema


def chart_rows(data: ReportData) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    rows: dict[str, dict[str, list[int]]] = {}
    for name, (kept, total) in data.keep_counts.items():
        stats = rows.setdefault(data.blocks[name] or name, {}).setdefault(data.kinds[name], [0, 0])
        stats[0] += kept
        stats[1] += total
    return [(block, {k: (v[0], v[1]) for k, v in kinds.items()}) for block, kinds in rows.items()]


def warnings(report) -> list[str]:
    """One line per warning of ``report`` (a PruneReport), put first where the node shows its text;
    the table's last lines name the modules."""
    lines = []
    if report.emptied:
        lines.append(f"WARNING: {len(report.emptied)} module(s) lost all their units (named at the end)")
    if report.silenced:
        lines.append(f"WARNING: {len(report.silenced)} module(s) lost all their units but must keep one, "
                     "output zeroed (named at the end)")
    return lines


class PruningReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffPruningReport", display_name="Pruning Report (EcoDiff)",
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
        text = "\n".join([*warnings(report.report), *(f"WARNING: {w}" for w in report.warnings),
                          f"mode: {report.mode}; target: {report.target}", report.report.to_text()])
        chart = kept_chart(chart_rows(report), f"{report.report.arch}: kept units per block ({report.mode})")
        return io.NodeOutput(text, chart, ui={"text": (text,), **ui.PreviewImage(chart, cls=cls).as_dict()})
