"""benchmarks/serve_load.py leaves no server process behind: what outlives a server's own exit
in its session (vLLM's engine processes do, for a moment) is ended too."""
import importlib.util
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
serve_load = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(serve_load)

# A "server" that starts a child deaf to SIGTERM, as an engine process still busy would be.
SERVER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c",
                  "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "open(sys.argv[1], 'w').write('ready'); time.sleep(600)", sys.argv[1]])
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed process whose parent has not reaped it yet)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_stop_ends_what_the_server_started(tmp_path):
    ready = tmp_path / "ready"
    server = serve_load.Server("test server", [sys.executable, "-c", SERVER, str(ready)],
                               port=0, log=tmp_path / "log", start_seconds=1)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), (tmp_path / "log").read_text()
        children = [int(pid) for pid in pathlib.Path(
            f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()]
        assert len(children) == 1
    finally:
        server.stop(grace=1)
    assert server.process.returncode is not None
    deadline = time.monotonic() + 5
    while running(children[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(children[0])
