"""Suite-wide fixtures and hooks: a per-tier summary (unit, integration, server, browser) at the end of a
run, so a CI log shows at a glance which tiers ran and which skipped, and why.

Test helpers import as modules: ``pyproject.toml`` puts the repository root (``ecodiff_core``,
``scripts.comfy_env``, ...) and ``tests/`` (``comfy_tiny``, ``comfy_server``, ...) on ``sys.path``."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small models: avoids oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tier(nodeid: str) -> str:
    parts = Path(nodeid.split("::", 1)[0]).parts
    if "tests" in parts:
        parts = parts[parts.index("tests") + 1:]
    return parts[0] if len(parts) > 1 else "other"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    counts: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, Counter] = defaultdict(Counter)
    for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if not nodeid or (outcome == "passed" and getattr(report, "when", "call") != "call"):
                continue
            tier = _tier(nodeid)
            counts[tier][outcome] += 1
            if outcome == "skipped" and isinstance(getattr(report, "longrepr", None), tuple):
                reasons[tier][str(report.longrepr[2]).removeprefix("Skipped: ")] += 1
    if not counts:
        return
    terminalreporter.section("tiers")
    for tier in sorted(counts):
        line = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts[tier].items()))
        terminalreporter.write_line(f"{tier}: {line}")
        for reason, n in reasons[tier].most_common(2):
            terminalreporter.write_line(f"    {n} skipped: {reason[:150]}")
