"""Benchmarks (scripts, not tests): `python -m bench.overhead`, `bench.inflight`, `bench.budget_race`.

Each runs its side-by-side comparison in one run against the local provider emulator and writes its results
section into docs/benchmarks.md. `bench.harness` holds what they share; `bench.emulator_server` is the emulator
process they start (pinned to its own core when `taskset` exists).
"""
