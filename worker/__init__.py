"""jobcloud worker daemon: registers with the proxy and runs jobs in locked-down
Docker containers. Talks to the proxy only over the HTTP worker protocol.
"""
