"""Entry point of one grader worker process: `python -m rewards._worker FD` (started by rewards.pool).

Protocol over the socket FD, pickled: the parent sends (factory "module:name", slot, options); the worker
answers ("ready",) or ("failed", traceback); then for each (task_id, payload) it answers
(task_id, "ok", value) or (task_id, "error", traceback). None or end-of-file from the parent ends it.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from multiprocessing.connection import Connection


def main(fd: int) -> None:
    conn = Connection(fd)
    factory_spec, slot, options = conn.recv()
    try:
        module_name, _, name = factory_spec.partition(":")
        handler = getattr(importlib.import_module(module_name), name)(slot, options)
    except Exception:
        conn.send(("failed", traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        task_id, payload = message
        try:
            reply = (task_id, "ok", handler(payload))
        except Exception:
            reply = (task_id, "error", traceback.format_exc(limit=8))
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
