#!/usr/bin/env python3
"""An EventService payload of our own, speaking the pilot's message protocol (AthenaMP's,
over yampl) as the pilot's generic executor expects:

  payload -> pilot  "Ready for events"
  pilot -> payload  a JSON list with one event range (as getEventRanges handed it), or
                    "No more events"
  payload -> pilot  "<absolute path>,ID:<eventRangeID>,CPU:<s>,WALL:<s>" (done), or
                    "ERR_<CODE> <eventRangeID>: <text>" (failed)

A range is Rubin's fine-grained shape: its event is ``first + startEvent - 1`` of the
label its LFN names (``<first>:<label>:...``), and its payload comes from the mapping
file in ``$RUBIN_ES_MAP_FILE`` (the dispatcher's /server/panda/esmap). A payload ``ok:X``
succeeds and writes its output file; ``once:PATH`` fails the first time (it creates
PATH), as ``tests.payloads:flaky`` does; ``fail:X`` fails. ``--sleep S``: each event
takes S seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time

import yampl  # tests/pilot/yampl.py, on PYTHONPATH


def main() -> int:
    channel = os.environ[sys.argv[sys.argv.index("--channel-env") + 1]]
    sleep = float(sys.argv[sys.argv.index("--sleep") + 1]) if "--sleep" in sys.argv else 0.0
    with open(os.environ["RUBIN_ES_MAP_FILE"]) as f:
        mapping = json.load(f)
    sock = yampl.ClientSocket(channel, "local")
    while True:
        sock.send_raw(b"Ready for events")
        size, body = sock.recv_raw()
        if size < 0 or body is None:
            return 1  # the pilot went away
        message = body.decode()
        if "No more events" in message:
            return 0
        for rng in json.loads(message):
            start = time.monotonic()
            first, label, _ = rng["LFN"].split(":", 2)
            number = int(first) + rng["startEvent"] - 1
            payload = mapping[label][str(number)]
            rid = rng["eventRangeID"]
            time.sleep(sleep)
            kind, _, arg = payload.partition(":")
            if kind == "once" and not os.path.exists(arg):
                with open(arg, "w") as f:
                    f.write("failed once\n")
                reply = f"ERR_TE_FATAL {rid}: first try of {arg} fails"
            elif kind == "fail":
                reply = f"ERR_TE_FATAL {rid}: payload {payload} failed"
            else:
                out = os.path.abspath(f"out_{rid}.txt")
                with open(out, "w") as f:
                    f.write(f"{payload}\n")
                wall = max(1, round(time.monotonic() - start))
                reply = f"{out},ID:{rid},CPU:{wall},WALL:{wall}"
            sock.send_raw(reply.encode())


if __name__ == "__main__":
    sys.exit(main())
