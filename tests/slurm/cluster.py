#!/usr/bin/env python3
"""A real SLURM on this one machine, for the tests marked ``slurm`` (Debian 12, root, no systemd).

    python3 tests/slurm/cluster.py install          # apt-get the packages when missing
    python3 tests/slurm/cluster.py start  [--dir D] # install if needed, start every daemon
    python3 tests/slurm/cluster.py status [--dir D]
    python3 tests/slurm/cluster.py stop   [--dir D] # stop exactly the processes `start` started

What ``start`` runs, each in the foreground of its own session so that its PID is the daemon's
own and can be recorded: a private MariaDB (own datadir, 127.0.0.1:16830) for accounting,
``munged``, ``slurmdbd`` (6819), ``slurmctld`` (6817) and two emulated nodes ``n1``/``n2``
(``slurmd -N``, ports 17001/17002, both on 127.0.0.1) in three partitions over both nodes:
``debug`` (the default, never preempted), ``low`` (``PreemptMode=REQUEUE``, ``GraceTime=60``)
and ``high`` (a higher ``PriorityTier``: its jobs preempt those of ``low``), with
``PreemptType=preempt/partition_prio`` and ``KillWait=30`` (SLURM's default). Every file
lives under ``--dir`` (default ``/tmp/spnet-slurm``); clients find the cluster through
``SLURM_CONF=<dir>/etc/slurm.conf`` (printed by ``start``, read by :func:`client_env`).

PIDs are written to ``<dir>/pids.json`` as each daemon starts; ``stop`` sends SIGTERM to those
PIDs only (after checking that each still runs the program it recorded) and never looks
processes up by name. If ``n1``/``n2`` do not resolve, a marked line is added to /etc/hosts
and removed again by ``stop`` (torch connects to the first node name as MASTER_ADDR).

Settings that matter (measured, see docs/library-facts.md "SLURM 22.05: signals at a stop"):
``AuthInfo=cred_expire=10`` + ``sched_interval=2`` make a requeued job restart in ~15 s instead
of ~145 s; without slurmdbd, ``sacct`` fails and submitit never learns that a job ended; the
preemption tests need ``GraceTime`` longer than a save and the ``low``/``high`` partitions.
Only the standard library is used: the script runs before any virtualenv exists.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("SPNET_SLURM_DIR", "/tmp/spnet-slurm"))
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
# One program per package that proves it is installed.
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadb-install-db")
NODES = ("n1", "n2")
NODE_PORTS = (17001, 17002)
CTLD_PORT, DBD_PORT, DB_PORT = 6817, 6819, 16830
HOSTS_MARK = "# spnet-dist tests/slurm emulated nodes"
# Preemption: a job in HIGH that needs the nodes preempts the jobs of LOW (PreemptMode=REQUEUE):
# SLURM SIGTERMs their tasks, waits GRACE_TIME s (plus up to its 30 s tick), then kills them and
# requeues them. The grace time must outlast a save of the test runs (seconds). KILL_WAIT is
# SLURM's default time from the last SIGTERM to SIGKILL (a scancel'd trainer saves within it).
LOW, HIGH = "low", "high"
GRACE_TIME = 60
KILL_WAIT = 30
POLICY_RC = Path("/usr/sbin/policy-rc.d")


class ClusterError(RuntimeError):
    """The cluster cannot be installed or started; the message says why."""


# --------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------


def missing_programs() -> list[str]:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
    return [p for p in PROGRAMS if shutil.which(p, path=search) is None]


def can_install() -> str | None:
    """None if this process may install packages and run daemons, else the reason it may not."""
    if os.geteuid() != 0:
        return "needs root (installs Debian packages, starts munged/slurmd as system daemons)"
    if shutil.which("apt-get") is None:
        return "apt-get not found (the SLURM test cluster is built from Debian packages)"
    return None


def install() -> None:
    """``apt-get install`` the SLURM, munge and MariaDB packages when any of them is missing.

    Package scripts would start MariaDB/munge as system services; a temporary
    ``policy-rc.d`` answering 101 ("action forbidden") stops that, so the only daemons that
    ever run are the ones :func:`start` starts and records.
    """
    if not missing_programs():
        return
    reason = can_install()
    if reason:
        raise ClusterError(f"SLURM packages missing ({', '.join(missing_programs())}); cannot install: {reason}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    placed_policy = not POLICY_RC.exists()
    if placed_policy:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        if subprocess.run(cmd, env=env).returncode != 0:  # stale package lists: refresh once
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(cmd, env=env, check=True)
    finally:
        if placed_policy:
            POLICY_RC.unlink(missing_ok=True)
    if missing_programs():
        raise ClusterError(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(missing_programs())}")


# --------------------------------------------------------------------------------------------
# Configuration files
# --------------------------------------------------------------------------------------------


def _node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory MB) for each emulated node, from ``slurmd -C``.

    RealMemory is set to 90 % of what slurmd measures: a node that reports less than its
    configured memory is drained as "Low RealMemory".
    """
    out = subprocess.run([_prog("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return int(fields["CPUs"]), int(int(fields["RealMemory"]) * 0.9)


def write_config(root: Path) -> Path:
    etc, state = root / "etc", root / "state"
    for sub in (etc, state, root / "log", root / "run", *(root / "spool" / n for n in NODES)):
        sub.mkdir(parents=True, exist_ok=True)
    cpus, memory = _node_resources()
    host = socket.gethostname()
    conf = etc / "slurm.conf"
    conf.write_text(f"""# written by tests/slurm/cluster.py
ClusterName=spnet
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
AuthType=auth/munge
# credentials of a requeued job expire after 10 s (minimum 5) instead of 120 s: fast restarts
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation={state}
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={DBD_PORT}
KillWait={KILL_WAIT}
# jobs of {HIGH} (PriorityTier=2) preempt those of {LOW}; debug jobs are never preempted
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{NODE_PORTS[0]}-{NODE_PORTS[1]}] CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName={LOW} Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime={GRACE_TIME}
PartitionName={HIGH} Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
""")
    dbd = etc / "slurmdbd.conf"
    dbd.write_text(f"""# written by tests/slurm/cluster.py
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={DBD_PORT}
SlurmUser=root
PidFile={root}/run/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={DB_PORT}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds a password)
    return conf


def client_env(root: Path = DEFAULT_DIR) -> dict[str, str]:
    """Environment variables SLURM clients (sbatch, squeue, sacct, scontrol) need for this cluster."""
    return {"SLURM_CONF": str(root / "etc" / "slurm.conf")}


# --------------------------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------------------------


def _prog(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join(["/usr/sbin", "/usr/bin", os.environ.get("PATH", "")]))
    if path is None:
        raise ClusterError(f"{name} not found; run `{sys.argv[0]} install` first")
    return path


class Daemons:
    """Starts daemons in the foreground of their own sessions and records their PIDs."""

    def __init__(self, root: Path):
        self.root = root
        self.pid_file = root / "pids.json"

    def records(self) -> list[dict]:
        return json.loads(self.pid_file.read_text()) if self.pid_file.exists() else []

    def _save(self, records: list[dict]) -> None:
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        os.replace(tmp, self.pid_file)

    def spawn(self, name: str, cmd: list[str], env: dict | None = None, user: str | None = None) -> int:
        log = open(self.root / "log" / f"{name}.console", "ab")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, user=user)
        log.close()
        self._save(self.records() + [{"name": name, "pid": proc.pid, "exe": Path(cmd[0]).name}])
        return proc.pid

    def alive(self, record: dict) -> bool:
        """True if the recorded PID still runs the recorded program (not a recycled PID)."""
        try:
            cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        stat = Path(f"/proc/{record['pid']}/stat").read_text()
        zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
        return not zombie and bool(cmdline) and Path(cmdline[0].decode()).name == record["exe"]

    def stop(self) -> list[str]:
        """SIGTERM every recorded daemon that is still ours (newest first); SIGKILL after 15 s."""
        stopped = []
        for record in reversed(self.records()):
            if not self.alive(record):
                continue
            os.kill(record["pid"], signal.SIGTERM)
            deadline = time.monotonic() + 15
            while self.alive(record) and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.alive(record):
                os.kill(record["pid"], signal.SIGKILL)
            stopped.append(f"{record['name']} (pid {record['pid']})")
        self.pid_file.unlink(missing_ok=True)
        return stopped


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(what: str, ok, timeout: float = 60, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.3)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise ClusterError(f"{what} did not come up within {timeout:.0f} s{tail}")


def _ensure_hosts(root: Path) -> None:
    """Make n1/n2 resolve to 127.0.0.1; remember that we did so ``stop`` can undo it."""
    try:
        for node in NODES:
            socket.gethostbyname(node)
        return
    except OSError:
        pass
    with open("/etc/hosts", "a") as f:
        f.write(f"127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")
    (root / "hosts_added").touch()


def _restore_hosts(root: Path) -> None:
    marker = root / "hosts_added"
    if not marker.exists():
        return
    lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
    Path("/etc/hosts").write_text("".join(line for line in lines if HOSTS_MARK not in line))
    marker.unlink()


def start(root: Path = DEFAULT_DIR) -> dict[str, str]:
    """Install when missing, then start MariaDB, munged, slurmdbd, slurmctld and two slurmd.

    Refuses if daemons recorded in ``root`` are still running or a SLURM port is taken.
    Returns :func:`client_env`.
    """
    install()
    daemons = Daemons(root)
    if any(daemons.alive(r) for r in daemons.records()):
        raise ClusterError(f"a cluster started from {root} is still running; run `stop --dir {root}` first")
    busy = [p for p in (CTLD_PORT, DBD_PORT, *NODE_PORTS, DB_PORT) if _port_open(p)]
    if busy:
        raise ClusterError(f"ports {busy} are already in use on 127.0.0.1 (another SLURM or database?)")
    if root.exists():
        shutil.rmtree(root)  # fresh state: job ids restart at 1 and no old job comes back
    root.mkdir(parents=True)
    conf = write_config(root)
    env = dict(os.environ, **client_env(root))
    try:
        _start_database(root, daemons)
        _start_munge(root, daemons)
        daemons.spawn("slurmdbd", [_prog("slurmdbd"), "-D"], env=env)
        _wait("slurmdbd", lambda: _port_open(DBD_PORT), log=root / "log" / "slurmdbd.log")
        daemons.spawn("slurmctld", [_prog("slurmctld"), "-D", "-i"], env=env)
        _wait("slurmctld", lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True,
                                                  text=True).stdout.count("UP") > 0,
              log=root / "log" / "slurmctld.log")
        _ensure_hosts(root)
        for node in NODES:
            daemons.spawn(f"slurmd-{node}", [_prog("slurmd"), "-D", "-N", node], env=env)
        _wait("nodes n1, n2 idle", lambda: _nodes_idle(env), log=root / "log" / "slurmctld.log")
    except BaseException:
        daemons.stop()
        _restore_hosts(root)
        raise
    return client_env(root) | {"SLURM_CONF": str(conf)}


def _nodes_idle(env: dict) -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True).stdout
    states = dict(line.split() for line in out.splitlines() if line.strip())
    if any(s.startswith(("down", "drain")) for s in states.values()):
        subprocess.run(["scontrol", "update", "nodename=n[1-2]", "state=resume"], env=env, capture_output=True)
    return all(states.get(n) == "idle" for n in NODES)


def _start_database(root: Path, daemons: Daemons) -> None:
    datadir, sock = root / "mysql", root / "run" / "mysqld.sock"
    subprocess.run([_prog("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True)
    daemons.spawn("mariadbd", [_prog("mariadbd"), "--no-defaults", f"--datadir={datadir}", "--user=root",
                               f"--socket={sock}", f"--port={DB_PORT}", "--bind-address=127.0.0.1",
                               f"--pid-file={root / 'run' / 'mariadbd.pid'}", "--innodb-buffer-pool-size=32M"])
    _wait("mariadbd", sock.exists, log=root / "log" / "mariadbd.console")
    sql = ("CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
           "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';")
    client = shutil.which("mariadb") or shutil.which("mysql") or "mariadb"
    subprocess.run([client, "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql], check=True)


def _start_munge(root: Path, daemons: Daemons) -> None:
    """munged runs as the ``munge`` user with the key the package created."""
    sock_dir = root / "munge"
    sock_dir.mkdir(exist_ok=True)
    shutil.chown(sock_dir, "munge", "munge")
    # Clients (slurmctld, sbatch, ...) look for the socket at the default path /run/munge.
    default_dir = Path("/run/munge")
    default_dir.mkdir(exist_ok=True)
    shutil.chown(default_dir, "munge", "munge")
    if Path(default_dir / "munge.socket.2").exists():
        probe = subprocess.run(["munge", "-n"], capture_output=True)
        if probe.returncode == 0:
            return  # a munged we did not start already serves this machine: use it, never stop it
    daemons.spawn("munged", [_prog("munged"), "--foreground", f"--socket={default_dir / 'munge.socket.2'}",
                             f"--pid-file={sock_dir / 'munged.pid'}", "--force"], user="munge")
    _wait("munged", lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0,
          log=root / "log" / "munged.console")


def status(root: Path = DEFAULT_DIR) -> str:
    daemons = Daemons(root)
    lines = [f"{r['name']:14s} pid {r['pid']:>7}  {'running' if daemons.alive(r) else 'gone'}"
             for r in daemons.records()]
    return "\n".join(lines) or f"no daemons recorded in {root}"


def _cancel_jobs(root: Path) -> None:
    """Cancel every job of this private cluster and wait (up to 30 s) until none is left, so
    that no job step outlives the daemons that would clean it up."""
    env = dict(os.environ, **client_env(root))
    if not (root / "etc" / "slurm.conf").exists() or not _port_open(CTLD_PORT):
        return
    jobs = subprocess.run(["squeue", "-h", "-o", "%A"], env=env, capture_output=True, text=True).stdout.split()
    if not jobs:
        return
    subprocess.run(["scancel", *jobs], env=env, capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and subprocess.run(
            ["squeue", "-h", "-o", "%A"], env=env, capture_output=True, text=True).stdout.split():
        time.sleep(1)


def stop(root: Path = DEFAULT_DIR) -> list[str]:
    if root.exists() and any(Daemons(root).alive(r) for r in Daemons(root).records()):
        _cancel_jobs(root)
    stopped = Daemons(root).stop() if root.exists() else []
    _restore_hosts(root)
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("install", "start", "status", "stop"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install()
            print("SLURM packages installed")
        elif args.command == "start":
            env = start(args.dir)
            print(status(args.dir))
            print(" ".join(f"export {k}={v}" for k, v in env.items()))
        elif args.command == "status":
            print(status(args.dir))
        else:
            print("stopped: " + (", ".join(stop(args.dir)) or "nothing"))
    except (ClusterError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
