"""`python -m bench.stage_c [--records N] [--sinks ...]`: stage (c) of `bench.run` alone, on a fresh
embedded stack, and how each sink's lane moved.

For A/B runs of one change (a minute each at 100,000 records, against `make bench`'s forty): one
worker on a prefilled topic, timed as `bench.run` times (c); then every lane change the worker
logged (a lane that spills in a backlog shows here). `--raw-job` runs stage (a''), the same job by
hand, first on the same stack and prints c/a'' of the two.
"""

from __future__ import annotations

import argparse

from bench.run import IngestStages, fresh_stack, raw_job_stage, summarize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--sinks", default="postgres,typesense")
    parser.add_argument("--raw-job", action="store_true", help="stage (a'') first, and c/a''")
    args = parser.parse_args()
    with fresh_stack("ingest-stage-c-", args.sinks) as (stack, settings, work):
        job = (raw_job_stage(stack, settings, work, args.records, args.sinks.split(","))
               if args.raw_job else None)
        stage = IngestStages(stack, settings, work, args.sinks).throughput("bench", args.records, 1)
    summary = summarize("ingest_stream end to end", args.records, stage)
    print(summary)
    if job is not None:
        print(job)
        print(f"c/a'' {summary['records_per_s'] / job['records_per_s']:.3f}")
    for log in sorted(work.glob("bench-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if " lane " in line and " -> " in line:
                print(line.strip())
    print(f"worker log and servers' data: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
