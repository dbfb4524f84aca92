"""The notebook in examples/ runs as a Jupyter kernel would run it: its code cells in order, in
one namespace, inside a running asyncio event loop."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "notebook_server.ipynb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_notebook_runs_inside_an_event_loop():
    with open(NOTEBOOK) as f:
        notebook = json.load(f)
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] for c in notebook["cells"] if c["cell_type"] == "code")  # shipped clean
    port = free_port()
    assert sum("port=8765" in c for c in cells) == 1
    cells = [c.replace("port=8765", f"port={port}") for c in cells]  # a port nothing else holds
    namespace: dict = {}
    printed = []

    async def kernel():
        asyncio.get_running_loop()  # as in Jupyter: cells run while this thread's loop runs
        for source in cells:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(source, NOTEBOOK, "exec"), namespace)
            printed.append(out.getvalue())

    try:
        asyncio.run(kernel())
    finally:
        if "server" in namespace:
            namespace["server"].stop()
    assert printed[0].split()[0] in ("length", "stop") and len(printed[0]) > 10  # greedy text
    assert printed[1].split()[-1] in ("length", "stop") and len(printed[1]) > 10  # streamed text
    assert printed[2].strip() == "True"  # HTTP's greedy text is the streamed one
    assert printed[3].strip().endswith("stopped)") and not namespace["http"].running
