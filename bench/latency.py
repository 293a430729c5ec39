"""`python -m bench.latency --rate R [--seconds S] [--sinks ...]`: `bench.run`'s latency run alone, at a
fixed rate, on a fresh embedded stack.

`make bench` paces it at 80 % of that run's (c), so its rate moves with the machine and the code; a
fixed rate makes runs of one change comparable (a minute each, against `make bench`'s forty).
Prints the latency figures as `bench.run` reports them.
"""

from __future__ import annotations

import argparse
import json

from bench.run import IngestStages, fresh_stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, required=True, help="records/s produced")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sinks", default="postgres,typesense")
    args = parser.parse_args()
    if not (args.rate > 0 and args.seconds > 0):
        parser.error("--rate and --seconds must be positive")
    with fresh_stack("ingest-latency-", args.sinks) as (stack, settings, work):
        figures = IngestStages(stack, settings, work, args.sinks).latency("benchlat", args.rate, args.seconds)
    print(json.dumps(figures))
    print(f"worker log and servers' data: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
