"""Experiment tools: suites of runs for the paper's tables, their reports, the paper's figures, the benchmarks
and the GPU check. Each has its ``python -m idql_pl.<tool>`` entry point."""
