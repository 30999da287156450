//! `keyward local-cluster` (what `hack/local-cluster up` runs) starts a working control
//! plane, and nothing outlives it: killing it with SIGKILL — the way a crashed or
//! aborted test binary dies — still stops etcd and kube-apiserver and, for a temporary
//! folder, removes their data.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn alive(pid: &str) -> bool {
    // A zombie has exited; only its parent's bookkeeping is left.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn killing_the_owner_stops_the_servers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("cluster");
    // Make sure the binaries exist before timing the start-up.
    keyward::control_plane::binaries().expect("control-plane binaries");
    let mut owner = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["local-cluster", "--dir"])
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "the control plane to be ready",
        Duration::from_secs(180),
        || state.join("ready").exists(),
    );
    let kubeconfig = std::fs::read_to_string(state.join("ready")).unwrap();
    assert!(Path::new(&kubeconfig).exists());
    let pids = std::fs::read_to_string(state.join("pids")).unwrap();
    let pids: Vec<&str> = pids.split_whitespace().collect();
    assert_eq!(pids.len(), 2);
    assert!(
        pids.iter().all(|p| alive(p)),
        "servers run while their owner does"
    );

    owner.kill().unwrap(); // SIGKILL: no destructor runs, only the watchdog can clean up
    owner.wait().unwrap();
    wait_for(
        "etcd and kube-apiserver to stop",
        Duration::from_secs(30),
        || pids.iter().all(|p| !alive(p)),
    );
}

#[test]
fn a_second_call_reuses_the_binaries() {
    let first = keyward::control_plane::binaries().expect("control-plane binaries");
    let built = std::fs::metadata(first.join("kube-apiserver"))
        .unwrap()
        .modified()
        .unwrap();
    let started = Instant::now();
    let second = keyward::control_plane::binaries().unwrap();
    assert_eq!(first, second);
    let again = std::fs::metadata(second.join("kube-apiserver"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(built, again, "nothing was rebuilt");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a cache hit is immediate"
    );
    for bin in ["kube-apiserver", "etcd"] {
        assert!(second.join(bin).exists(), "{bin} in {}", second.display());
    }
}
