//! Container attribution: a process moved into a cgroup named the way
//! container runtimes name theirs (`docker-<64 hex>.scope`) is reported
//! with that container id on its connections and in the metrics.
#![allow(clippy::unwrap_used)]

use std::{fs, path::PathBuf};

use poolscope_tests::{require_kernel, Agent, ConnClient, Postgres};

/// Where a cgroup can be made here: the cgroup v2 mount if there is one
/// (a pure v2 host mounts it at /sys/fs/cgroup, a hybrid one at .../unified),
/// else the v1 name=systemd hierarchy.
fn cgroup_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut v1_systemd = None;
    for line in mounts.lines() {
        let mount_point = line.split_whitespace().nth(4).unwrap_or_default();
        let after = line.split(" - ").nth(1).unwrap_or_default();
        if after.starts_with("cgroup2 ") {
            return PathBuf::from(mount_point);
        }
        if after.starts_with("cgroup ") && after.contains("name=systemd") {
            v1_systemd = Some(PathBuf::from(mount_point));
        }
    }
    v1_systemd.expect("no cgroup2 or name=systemd cgroup mount")
}

/// A cgroup made by the test, removed (after its processes left) on drop.
struct TestCgroup {
    parent: PathBuf,
    leaf: PathBuf,
}

impl TestCgroup {
    fn new(container_id: &str) -> TestCgroup {
        let parent = cgroup_root().join(format!("poolscope-test-{}", std::process::id()));
        let leaf = parent.join(format!("docker-{container_id}.scope"));
        fs::create_dir_all(&leaf)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", leaf.display()));
        TestCgroup { parent, leaf }
    }

    fn adopt(&self, pid: u32) {
        fs::write(self.leaf.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.leaf);
        let _ = fs::remove_dir(&self.parent);
    }
}

#[test]
fn a_process_in_a_container_cgroup_is_reported_with_its_container_id() {
    if !require_kernel() {
        return;
    }
    let container_id = format!("{:064x}", 0x5eed_c0de_u64 + u64::from(std::process::id()));
    let pg = Postgres::start();
    let agent = Agent::start();
    let cgroup = TestCgroup::new(&container_id);
    let mut client = ConnClient::spawn();
    cgroup.adopt(client.pid);
    let cgroup_file = fs::read_to_string(format!("/proc/{}/cgroup", client.pid)).unwrap();
    assert!(
        cgroup_file.contains(&container_id),
        "not moved:\n{cgroup_file}"
    );

    let (fd, _) = client.open("127.0.0.1", pg.port);
    let conn = agent.wait_for(client.pid, "a connection with its container id", |conns| {
        conns
            .iter()
            .find(|c| c.fd == fd && c.placement.container_id.is_some())
            .cloned()
    });
    assert_eq!(
        conn.placement.container_id.as_deref(),
        Some(container_id.as_str())
    );
    let series = format!(
        "poolscope_connection_open{{container_id=\"{container_id}\",process_pid=\"{}\"}}",
        client.pid
    );
    agent.wait_for_metric(&series, |v| v == 1.0);

    client.close(fd);
    drop(client);
}
