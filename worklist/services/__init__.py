"""Use cases. Each function takes the session explicitly (keyword-only) and owns no transaction
boundary of its own unless it says so; the edge opens `runtime.session()` around it."""
