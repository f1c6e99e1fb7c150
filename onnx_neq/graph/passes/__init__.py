"""Pure graph passes: model in, model out, plus a report of what each changed."""
