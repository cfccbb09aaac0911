"""A real one-node SLURM for tests: munge + slurmctld + slurmd with a generated slurm.conf in a temp directory.

Root only (the daemons run as root, no systemd). Installs Debian's packages when they are missing. Everything
this helper writes lives under its own directory (SLURM_CONF points there, private ports, pid files and spool),
and `stop()` kills only the daemons it started, by the PIDs they wrote. Clients (sbatch, squeue, scontrol,
scancel) find the cluster through `cluster.env` (SLURM_CONF).
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged"]


def unavailable_reason() -> str | None:
    """Why a real SLURM cannot be started here (None when it can): not root, or no way to install it."""
    if os.name != "posix" or os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return f"SLURM is not installed and apt-get is unavailable to install {' '.join(PACKAGES)}"
    return None


def install() -> None:
    """apt-get install the daemons and clients if any is missing (about 15 s on Debian 12)."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", *PACKAGES], check=True, env=env, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as slurmd -C reports them."""
    out = subprocess.run([_bin("slurmd"), "-C"], check=True, capture_output=True, text=True).stdout
    fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
    return int(fields["CPUs"]), int(fields["RealMemory"])


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _read_pid(path: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear")


class SlurmCluster:
    """A one-node cluster (partition `debug`) living in `root`; use as a context manager."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.host = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, int] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- start -------------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        install()
        self._start_munge()
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            pidfile = self.root / f"{daemon}.pid"
            subprocess.run([_bin(daemon), "-f", str(self.conf)], check=True, env=self.env)
            self.pids[daemon] = _read_pid(pidfile)
        self._wait_for_node(timeout)
        return self

    def _start_munge(self) -> None:
        """Reuse a munged that answers; otherwise start one (as the munge user) and remember its PID."""
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run([_bin("mungekey"), "-c"], check=True)
        for d in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        for f in Path("/etc/munge").iterdir():
            shutil.chown(f, "munge", "munge")
        pidfile = Path("/run/munge/munged.pid")
        pidfile.unlink(missing_ok=True)
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", _bin("munged")], check=True)
        self.pids["munged"] = _read_pid(pidfile)
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged started but `munge -n | unmunge` fails")

    def _write_conf(self) -> None:
        cpus, memory = node_resources()
        spool, state, logs = self.root / "spool", self.root / "state", self.root / "log"
        for d in (spool, state, logs):
            d.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=ldtest
SlurmctldHost={self.host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={logs}/slurmctld.log
SlurmdLogFile={logs}/slurmd.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SchedulerParameters=sched_interval=1
NodeName={self.host} CPUs={cpus} RealMemory={max(memory - 512, 256)} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _wait_for_node(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
            if out and out.split()[0].rstrip("*") in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout}s: {self.run(['sinfo'], check=False).stdout}\n"
                           + (self.root / "log" / "slurmctld.log").read_text()[-2000:])

    # ---- use ---------------------------------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, **kwargs)

    def sbatch(self, script, *args: str, options: tuple[str, ...] = (), cwd=None) -> int:
        """Submit `script` with extra sbatch `options` and script `args`; returns the job id."""
        out = self.run(["sbatch", "--parsable", *options, str(script), *args], cwd=cwd).stdout
        return int(out.strip().split(";")[0].split("_")[0])

    def job(self, job_id) -> dict:
        """`scontrol show job` as a dict (first record: the job, or an array's first element); {} once purged."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False).stdout
        if not out.strip():
            return {}
        first = out.strip().splitlines()[0]
        return dict(tok.split("=", 1) for tok in first.split() if "=" in tok)

    def jobs(self, job_id) -> list[dict]:
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False).stdout
        return [dict(tok.split("=", 1) for tok in line.split() if "=" in tok) for line in out.strip().splitlines()]

    def wait(self, predicate, timeout: float, what: str, poll: float = 1.0):
        """Poll `predicate()` until truthy; returns its value or raises TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"{what} not within {timeout}s")

    def wait_done(self, job_id, timeout: float) -> list[dict]:
        """Wait until every element of the job has left PENDING/RUNNING; returns their records."""
        def done():
            records = self.jobs(job_id)
            active = [r for r in records if r.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                                                                     "REQUEUED", "SUSPENDED")]
            return records if records and not active else None
        return self.wait(done, timeout, f"job {job_id} to finish")

    # ---- stop --------------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Kill the daemons this object started (by PID, never by name) and wait for them to exit."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
