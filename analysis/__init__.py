"""Reading finished runs: summary tables over a sweep (summarize) and figures of one run (plots)."""
