"""Pure graph passes: model in; model out, with `modified` and a report of what that call changed (`_result.ReportedResult`)."""
