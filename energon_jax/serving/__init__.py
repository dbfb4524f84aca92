"""Serving: a pure-Python scheduler, engine loops, the HTTP front end and an in-process `Server`.

FastAPI/uvicorn/prometheus-client (the `serve` extra) are imported only when a server starts.
"""
from energon_jax.serving.api import RequestHandle, Server
from energon_jax.serving.scheduler import Delta, QueueFull, SamplingOptions, Scheduler, ShuttingDown

__all__ = ["Delta", "QueueFull", "RequestHandle", "SamplingOptions", "Scheduler", "Server", "ShuttingDown"]
