"""Serving: a pure-Python scheduler, engine loops, the HTTP front end and an in-process `Server`.

FastAPI and uvicorn (the `serve` extra) are imported only when the HTTP routes start; the in-process
`Server` needs neither (its metrics use prometheus-client, a base dependency).
"""
from energon_jax.serving.api import RequestHandle, Server
from energon_jax.serving.scheduler import Delta, QueueFull, SamplingOptions, Scheduler, ShuttingDown

__all__ = ["Delta", "QueueFull", "RequestHandle", "SamplingOptions", "Scheduler", "Server", "ShuttingDown"]
