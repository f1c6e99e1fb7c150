"""What every pass returns: onnx-ir's PassResult with the report of what the pass did in that call.

A pass keeps no state between calls: `modified` and `report` describe the call that returned them, so
one pass object can run on many models. `ir.passes.Sequential` returns a plain PassResult; run a pass
on its own where its report is needed.
"""

from __future__ import annotations

import dataclasses
from typing import Generic, TypeVar

import onnx_ir as ir

Report = TypeVar("Report")


@dataclasses.dataclass
class ReportedResult(ir.passes.PassResult, Generic[Report]):
    """`model` and `modified` as onnx-ir's own passes return them; `report`: the pass's frozen report of this call."""

    report: Report
