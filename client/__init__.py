"""The user side of the `jobcloud` command: an HTTP client for the user API
(`api.py`), its exception hierarchy (`errors.py`), the local config file
(`config.py`) and the command line (`cli.py`).

Talks to the proxy over HTTP only, so a user's machine needs `requests` but
never Flask: the admin commands, which run on the proxy host, are imported
only when one of them is asked for.
"""
