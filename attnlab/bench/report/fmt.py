"""Text of the report's numbers, shared by the page and the Markdown summary: one unit per quantity.

Times in a readable unit (812 µs, 1.23 ms), memory always in MiB (the plots' axis unit
too), ratios with a ×, accuracy rounded down so that 0.99 on the page means at least 0.99.
"""
from __future__ import annotations

import html
import math
from typing import Any

MIB = 2.0**20
MEMORY_UNIT = "MiB"  # the one memory unit of tables, plots and exports' shown text
STATUS_TEXT = {
    "ok": "ok",
    "over_time": "over time",
    "over_memory": "over memory",
    "error": "error",
    "disagree": "disagree",
    "unsupported": "unsupported",
}
NOT_MEASURED = "not measured"


def fmt_time(seconds: float | None) -> str:
    """Seconds with three significant digits in a readable unit: 812 µs, 1.23 ms, 4.56 s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def mib(count: float | None) -> float | None:
    """Bytes as MiB (None stays None)."""
    return None if count is None else count / MIB


def fmt_mib(count: float | None) -> str:
    """Bytes shown in MiB with three significant digits (never another unit): 0.5 MiB, 32 MiB, 4.1e+03 MiB."""
    if count is None or not math.isfinite(count):
        return "-"
    return f"{count / MIB:.3g} {MEMORY_UNIT}"


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}×"


def fmt_speedup(ratio: float) -> str:
    """A time ratio (mine / reference) as the reader says it: "3.1× faster" or "1.4× slower"."""
    return f"{1 / ratio:.3g}× faster" if ratio < 1 else f"{ratio:.3g}× slower"


def fmt_accuracy(accuracy: float | None) -> str:
    """Accuracy rounded down to two decimals, so that 0.99 on the page means at least 0.99."""
    return "-" if accuracy is None else f"{math.floor(accuracy * 100 + 1e-9) / 100:.2f}"


def fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) if params else ""


def fmt_num(value: Any, digits: int = 2, *, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def status_text(status: str) -> str:
    return STATUS_TEXT.get(status, status)


def esc(value: Any) -> str:
    """Text for HTML (element content or a quoted attribute)."""
    return html.escape(str(value), quote=True)


def md(value: Any) -> str:
    """Text for a Markdown table cell: characters Markdown would read as markup are backslash-escaped."""
    text = str(value).replace("\n", " ")
    for char in "\\|<>`*[]":
        text = text.replace(char, "\\" + char)
    return text
