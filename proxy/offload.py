"""CPU-heavy work kept off gevent's event loop.

Under gunicorn's gevent workers one OS thread serves every connection of a
process: a password hash or the check of a 100,000-entry zip run inline would
stop all of them (claim long-polls, live pages, other requests) for seconds.
`run` hands such work to the hub's pool of real threads and waits for it
cooperatively: scrypt and zlib release the GIL, and pure Python shares it with
the event loop every few milliseconds (sys.getswitchinterval), so the process
keeps answering. Outside gevent (tests, the CLI) it runs inline.
"""
from __future__ import annotations

import sys


def run(fn, *args):
    """`fn(*args)`, in gevent's thread pool when gevent has patched threading."""
    pool = _gevent_threadpool()
    return fn(*args) if pool is None else pool.apply(fn, args)


def _gevent_threadpool():
    """gevent's pool of real threads when gevent has patched threading, else None.

    Looked up in sys.modules: a process that gevent patched has imported
    gevent.monkey; one that did not never imports gevent here.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return None
    import gevent

    return gevent.get_hub().threadpool
