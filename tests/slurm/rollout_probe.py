"""Stand-in trainer for the rollout-node tests: wait until every URL in RLRT_ROLLOUT_URLS answers
(the job's separate rollout nodes), print them, exit 0. `--hold S`: then sleep S seconds."""

from __future__ import annotations

import os
import sys
import time
import urllib.request


def main() -> int:
    urls = [u for u in os.environ.get("RLRT_ROLLOUT_URLS", "").split(",") if u]
    if not urls:
        print("no RLRT_ROLLOUT_URLS", flush=True)
        return 4
    hold = float(sys.argv[sys.argv.index("--hold") + 1]) if "--hold" in sys.argv else 0.0
    deadline = time.monotonic() + 120
    for url in urls:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    print(f"rollout server {url} answered {r.status}", flush=True)
                    break
            except OSError:
                if time.monotonic() > deadline:
                    print(f"rollout server {url} never answered", flush=True)
                    return 5
                time.sleep(0.5)
    time.sleep(hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
