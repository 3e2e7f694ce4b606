"""Autobahn TestSuite cases driven as a client by kosoku (PyPI), against one URL.

Usage: autobahn.py URL CASE_PATTERN...
Runs the selected cases against the WebSocket server at URL (an echo server) and prints
one JSON object per line, per case, in case order:
  {"case": "1.1.1", "behavior": "OK", "behavior_close": "OK", "remote_close_code": 1000,
   "local_close_code": 1000, "was_clean": true, "closed_by_me": true, "dropped_by_me": false,
   "failed_by_me": false, "passed": true}
A case that does not pass is still printed (kosoku raises FailureError carrying every
result); the exit status is 0 whenever every selected case was run to a verdict.
"""
import asyncio
import json
import sys

from kosoku import FailureError, run_fuzzingclient


async def main(url: str, cases: list[str]) -> None:
    try:
        results = await run_fuzzingclient(url, cases=cases, concurrency=1)
    except FailureError as failure:
        results = failure.results
    for r in results:
        print(
            json.dumps(
                {
                    "case": r.case_id,
                    "behavior": r.behavior.value,
                    "behavior_close": r.behavior_close.value,
                    "remote_close_code": r.remote_close_code,
                    "local_close_code": r.local_close_code,
                    "was_clean": r.was_clean,
                    "closed_by_me": r.closed_by_me,
                    "dropped_by_me": r.dropped_by_me,
                    "failed_by_me": r.failed_by_me,
                    "passed": r.passed,
                    "result": r.result,
                    "result_close": r.result_close,
                    "duration_ms": r.duration,
                }
            )
        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
