"""A scratch Apache Pulsar standalone for the measurement tools (`--broker pulsar`): the launcher
of `alpes up --broker pulsar` (deploy/pulsar/run-standalone.sh) on free loopback ports in a
scratch directory, without authentication, a topic created on first use with `partitions`
partitions (as the embedded broker's `default_partitions` does), so a tool runs the same steps on
both brokers. Nothing here is used by the platform."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from alpes.kernel.ports import listen_port
from alpes.pulsar_standalone import find_launcher, resolve_classpath, wait_ready


class ScratchPulsar:
    embedded = False

    def __init__(self, root: Path, partitions: int = 6) -> None:
        self.root = root
        self.launcher = find_launcher()
        resolve_classpath(self.launcher, root / "maven.log")
        self.port, self.web_port = listen_port(), listen_port()
        self.url = f"pulsar://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.web_port}"
        conf = root / "extra.conf"
        conf.write_text(f"allowAutoTopicCreationType=partitioned\ndefaultNumPartitions={partitions}\n")
        self.env = {**os.environ, "PULSAR_STANDALONE_EXTRA_CONF": str(conf), "PULSAR_BOOKIE_PORT": str(listen_port())}
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.root / "broker.log", "ab") as log:
            self.process = subprocess.Popen([str(self.launcher), str(self.root / "pulsar"), str(self.port),
                                             str(self.web_port)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        wait_ready(self.admin_url, None, self.process)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return (self.root / "broker.log").read_text(errors="replace")
