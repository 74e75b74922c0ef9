"""jobcloud benchmarks: `python -m bench [NAMES...]` (what `make bench` runs).

Each benchmark builds its own proxy (a temp data dir, a SQLite store seeded
directly, the real gunicorn with the default proxy/gunicorn_conf.py on a free
loopback port), drives it over HTTP for a bounded time, and returns the
figures with the target each is judged against. `python -m bench` writes them
to docs/PERFORMANCE.md and the raw numbers to bench/results/ (git-ignored).
"""
