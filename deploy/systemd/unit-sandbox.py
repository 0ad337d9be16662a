#!/usr/bin/python3
"""Runs a command under the sandbox of a systemd service unit, rebuilt
without systemd: for machines (containers, CI) where systemd is not PID 1,
so that `systemctl start` cannot be tried.

    unit-sandbox.py UNIT_FILE -- COMMAND [ARGS...]        (as root)

tests/tests/deploy.rs runs the agent this way under poolscope.service.
Needs util-linux (unshare, setpriv, mount) and python3-seccomp.

What it rebuilds, in the order systemd applies it:
  namespaces   new mount, UTS and IPC namespaces (PrivateMounts,
               ProtectHostname, the mounts below stay private)
  mounts       ProtectSystem=strict (every mount read-only but /proc, /sys,
               /dev), ProtectKernelTunables (/sys and /proc/sys... read-only),
               ProtectControlGroups, ProtectKernelModules, ProtectKernelLogs,
               ProtectHome=yes, PrivateTmp=yes, PrivateDevices=yes (a /dev of
               pseudo devices), RuntimeDirectory= (a writable tmpfs owned by
               the service user, mode RuntimeDirectoryMode=)
  limits       LimitMEMLOCK=, LimitNOFILE=, MemoryDenyWriteExecute=yes (PR_SET_MDWE, the
               kernel feature systemd 254+ uses)
  identity     DynamicUser=yes or User= (as `nobody`), CapabilityBoundingSet=,
               AmbientCapabilities=, NoNewPrivileges=yes (setpriv)
  seccomp      one libseccomp filter per setting, as systemd builds them:
               RestrictAddressFamilies= (EAFNOSUPPORT), RestrictNamespaces=yes
               (clone3 ENOSYS, unshare/setns/namespace clone flags EPERM),
               RestrictRealtime=, LockPersonality=, ProtectClock=, the system
               calls of ProtectKernelModules=, ProtectKernelLogs=,
               PrivateDevices=; SystemCallArchitectures=native (any filter
               kills calls through another ABI); SystemCallFilter= (expanded
               with `systemd-analyze syscall-filter`, @default included,
               SystemCallErrorNumber= or kill), loaded last
  UMask=

Not rebuilt: RestrictSUIDSGID= (the agent makes no files it could mark),
DeviceAllow= (cgroup device policy), and everything only the service manager
does (Restart=, ordering, journal). Unknown directives are reported.

SANDBOX_NO_TRACEFS=1 unmounts /sys/kernel/tracing first, as on a host that
has not mounted tracefs.
"""
import ctypes
import errno
import os
import re
import resource
import socket
import stat
import subprocess
import sys

NOBODY = ("nobody", "nogroup", 65534, 65534)

HANDLED = {
    "Type", "ExecStart", "Restart", "RestartSec", "TimeoutStopSec", "Description",
    "Documentation", "After", "Wants", "Requires", "WantedBy", "Environment",
    "DynamicUser", "User", "Group", "CapabilityBoundingSet", "AmbientCapabilities",
    "NoNewPrivileges", "LimitMEMLOCK", "LimitNOFILE", "ProtectSystem", "RuntimeDirectory",
    "RuntimeDirectoryMode", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "PrivateMounts", "UMask", "ProtectKernelModules", "ProtectKernelTunables",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
    "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
    "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute",
    "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber",
}

# Namespace flags of clone(2)/unshare(2).
CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080


def unit_settings(path):
    # The unit's text travels in the environment: PrivateTmp= or
    # ProtectHome= may hide the file from the later stages.
    if "SANDBOX_UNIT" not in os.environ:
        with open(path) as f:
            os.environ["SANDBOX_UNIT"] = f.read()
    settings = {}
    for line in os.environ["SANDBOX_UNIT"].splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def last(settings, key, default=None):
    return settings.get(key, [default])[-1]


def yes(settings, key):
    return (last(settings, key, "no") or "no").lower() in ("yes", "true", "on", "1", "strict")


def sh(*cmd):
    subprocess.run(cmd, check=True)


def mount_points():
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in points]


def under(point, prefix):
    return point == prefix or point.startswith(prefix.rstrip("/") + "/")


def read_only(points):
    for point in points:
        # Some (e.g. masked /proc files) cannot be remounted; systemd skips
        # them too.
        subprocess.run(["mount", "-o", "remount,bind,ro", point],
                       stderr=subprocess.DEVNULL, check=False)


def inaccessible(path):
    if os.path.isdir(path) and not os.path.islink(path):
        sh("mount", "-t", "tmpfs", "-o", "mode=000,ro,size=4k", "tmpfs", path)
    elif os.path.exists(path):
        sh("mount", "--bind", "/dev/null", path)


def cap_list(settings, key):
    caps = " ".join(settings.get(key, [])).split()
    return ",".join("+" + c.lower().removeprefix("cap_") for c in caps)


def stage_mounts(unit, command):
    """Root, in the new namespaces: mounts, limits, then setpriv."""
    s = unit_settings(unit)
    unknown = sorted(set(s) - HANDLED)
    if unknown:
        print(f"unit-sandbox: not reproduced: {', '.join(unknown)}", file=sys.stderr)
    sh("mount", "--make-rprivate", "/")
    if os.environ.get("SANDBOX_NO_TRACEFS") == "1":
        sh("umount", "/sys/kernel/tracing")
    runtime = last(s, "RuntimeDirectory")
    if runtime:
        # Created on the host as systemd would; mounted over below so that a
        # real /run/NAME and its sockets are left alone.
        os.makedirs(f"/run/{runtime}", exist_ok=True)
    if last(s, "ProtectSystem") == "strict":
        read_only([p for p in mount_points()
                   if not any(under(p, api) for api in ("/proc", "/dev", "/sys"))])
    elif last(s, "ProtectSystem"):
        sys.exit("unit-sandbox: only ProtectSystem=strict is reproduced")
    if yes(s, "ProtectKernelTunables"):
        read_only([p for p in mount_points() if under(p, "/sys")])
        for p in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs",
                  "/proc/latency_stats", "/proc/timer_stats", "/proc/acpi", "/proc/scsi"):
            if os.path.exists(p):
                sh("mount", "--bind", p, p)
                read_only([p])
    if yes(s, "ProtectControlGroups"):
        read_only([p for p in mount_points() if under(p, "/sys/fs/cgroup")])
    if yes(s, "ProtectKernelModules"):
        for p in ("/usr/lib/modules", "/lib/modules"):
            inaccessible(p)
    if yes(s, "ProtectKernelLogs"):
        inaccessible("/proc/kmsg")
    if last(s, "ProtectHome") not in (None, "no", "false"):
        if last(s, "ProtectHome") != "yes":
            sys.exit("unit-sandbox: only ProtectHome=yes is reproduced")
        for p in ("/home", "/root", "/run/user"):
            inaccessible(p)
    if yes(s, "PrivateTmp") or yes(s, "DynamicUser"):
        for p in ("/tmp", "/var/tmp"):
            sh("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", p)
    if yes(s, "PrivateDevices"):
        sh("mount", "-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", "/dev")
        for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7),
                                   ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)):
            os.mknod(f"/dev/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(f"/dev/{name}", 0o666)
        os.mkdir("/dev/shm")
        sh("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/dev/shm")
    user = yes(s, "DynamicUser") or last(s, "User") not in (None, "root")
    if runtime:
        mode = last(s, "RuntimeDirectoryMode", "0755")
        sh("mount", "-t", "tmpfs", "-o", f"mode={mode},size=1m,nosuid,nodev", "tmpfs",
           f"/run/{runtime}")
        if user:
            os.chown(f"/run/{runtime}", NOBODY[2], NOBODY[3])
    memlock = last(s, "LimitMEMLOCK")
    if memlock:
        value = resource.RLIM_INFINITY if memlock == "infinity" else parse_bytes(memlock)
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (value, value))
        except (ValueError, OSError) as e:
            # Raising a hard limit needs CAP_SYS_RESOURCE, which PID 1 has
            # and some containers lack; kernels from 5.11 on ignore it.
            print(f"unit-sandbox: not reproduced: LimitMEMLOCK={memlock} ({e})", file=sys.stderr)
    nofile = last(s, "LimitNOFILE")
    if nofile:
        value = resource.RLIM_INFINITY if nofile == "infinity" else int(nofile)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (value, value))
        except (ValueError, OSError) as e:
            # Above the current hard limit it needs CAP_SYS_RESOURCE too.
            print(f"unit-sandbox: not reproduced: LimitNOFILE={nofile} ({e})", file=sys.stderr)
    if yes(s, "MemoryDenyWriteExecute"):
        libc = ctypes.CDLL(None, use_errno=True)
        # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: kept across fork and exec.
        if libc.prctl(65, 1, 0, 0, 0) != 0:
            sys.exit(f"unit-sandbox: PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
    setpriv = ["setpriv"]
    if user:
        setpriv += ["--reuid", NOBODY[0], "--regid", NOBODY[1], "--clear-groups"]
    bounding = cap_list(s, "CapabilityBoundingSet")
    if bounding:
        setpriv += ["--bounding-set", "-all," + bounding]
    ambient = cap_list(s, "AmbientCapabilities")
    if ambient:
        setpriv += ["--inh-caps", "-all," + ambient, "--ambient-caps", "-all," + ambient]
    if yes(s, "NoNewPrivileges") or yes(s, "DynamicUser") or s.get("SystemCallFilter"):
        setpriv += ["--no-new-privs"]
    os.execvp("setpriv", setpriv + ["--", sys.executable, "-c", os.environ["SANDBOX_SOURCE"],
                                    "--seccomp", unit, "--"] + command)


def parse_bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def stage_seccomp(unit, command):
    """The service's user and capabilities: seccomp filters, then exec."""
    import seccomp

    s = unit_settings(unit)
    groups = parse_groups(subprocess.run(["systemd-analyze", "syscall-filter"],
                                         capture_output=True, text=True, check=True).stdout)
    eperm = seccomp.ERRNO(errno.EPERM)

    def deny(names, action=eperm):
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        for name in sorted(names):
            add(f, action, name)
        f.load()

    families = s.get("RestrictAddressFamilies")
    if families:
        allowed = sorted(getattr(socket, fam) for fam in " ".join(families).split())
        refuse = seccomp.ERRNO(errno.EAFNOSUPPORT)
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.GT, allowed[-1]))
        for fam in range(allowed[-1]):
            if fam not in allowed:
                f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.EQ, fam))
        f.load()
    if yes(s, "RestrictNamespaces"):
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        # clone3's flags are out of seccomp's reach: systemd answers ENOSYS,
        # so that libc falls back to clone.
        add(f, seccomp.ERRNO(errno.ENOSYS), "clone3")
        add(f, eperm, "setns")
        for bit in range(32):
            if CLONE_NEW & (1 << bit):
                for call in ("clone", "unshare"):
                    f.add_rule(eperm, call, seccomp.Arg(0, seccomp.MASKED_EQ, 1 << bit, 1 << bit))
        f.load()
    if yes(s, "RestrictRealtime"):
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        for policy in (1, 2, 6):  # SCHED_FIFO, SCHED_RR, SCHED_DEADLINE
            f.add_rule(eperm, "sched_setscheduler", seccomp.Arg(1, seccomp.EQ, policy))
        f.load()
    if yes(s, "LockPersonality"):
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        # Only the current personality (PER_LINUX) passes, as in systemd 252.
        f.add_rule(eperm, "personality", seccomp.Arg(0, seccomp.NE, 0))
        f.load()
    denied = set()
    if yes(s, "ProtectClock"):
        denied |= expand(groups, "@clock")
    if yes(s, "ProtectKernelModules"):
        denied |= expand(groups, "@module")
    if yes(s, "ProtectKernelLogs"):
        denied.add("syslog")
    if yes(s, "PrivateDevices"):
        denied |= expand(groups, "@raw-io")
    if denied:
        deny(denied)
    if last(s, "SystemCallArchitectures") not in (None, "native"):
        sys.exit("unit-sandbox: only SystemCallArchitectures=native is reproduced")
    # (Every libseccomp filter holds the native architecture only: a call
    # through another ABI gets the bad-architecture action, kill.)
    umask = last(s, "UMask")
    if umask:
        os.umask(int(umask, 8))
    allow = s.get("SystemCallFilter")
    if allow:
        # Loaded last: it may not allow seccomp() itself.
        names = expand(groups, "@default")
        for entry in " ".join(allow).split():
            if entry.startswith("~"):
                sys.exit("unit-sandbox: only allow-list SystemCallFilter= is reproduced")
            names |= expand(groups, entry)
        errno_name = last(s, "SystemCallErrorNumber")
        default = seccomp.ERRNO(getattr(errno, errno_name)) if errno_name else seccomp.KILL_PROCESS
        f = seccomp.SyscallFilter(default)
        for name in sorted(names):
            add(f, seccomp.ALLOW, name)
        f.load()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    os.execvpe(command[0], command, env)


def add(f, action, name):
    try:
        f.add_rule(action, name)
    except (RuntimeError, ValueError, OSError):
        pass  # not a system call of this architecture


def parse_groups(text):
    groups, current = {}, None
    for line in text.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.split()[0])
    return groups


def expand(groups, entry, seen=None):
    if not entry.startswith("@"):
        return {entry}
    seen = set() if seen is None else seen
    names = set()
    for item in groups[entry]:
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                names |= expand(groups, item, seen)
        else:
            names.add(item)
    return names


def main(args):
    seccomp_stage = args[:1] == ["--seccomp"]
    if seccomp_stage:
        args = args[1:]
    if len(args) < 3 or args[1] != "--":
        sys.exit(__doc__)
    unit, command = args[0], args[2:]
    if seccomp_stage:
        stage_seccomp(unit, command)
    elif os.environ.get("SANDBOX_IN_NAMESPACES") == "1":
        stage_mounts(unit, command)
    else:
        if os.geteuid() != 0:
            sys.exit("unit-sandbox: run as root")
        unit_settings(unit)
        os.environ["SANDBOX_IN_NAMESPACES"] = "1"
        if "SANDBOX_SOURCE" not in os.environ:
            with open(__file__) as f:
                os.environ["SANDBOX_SOURCE"] = f.read()
        # unshare execs (no fork): the command keeps this process's pid.
        os.execvp("unshare", ["unshare", "--mount", "--uts", "--ipc", "--propagation", "private",
                              sys.executable, "-c", os.environ["SANDBOX_SOURCE"]] + args)


if __name__ == "__main__":
    main(sys.argv[1:])
