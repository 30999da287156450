//! `keyward run` as a child process of the suite: started, SIGKILLed, started again.
//! Every incarnation appends its stderr to one log file, which the value audit reads
//! and a reader of a failed run starts from.

use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Operator {
    ns: String,
    issue_deadline: Duration,
    log: PathBuf,
    child: Option<Child>,
    metrics_port: u16,
    pub starts: usize,
    pub kills: usize,
    /// Incarnations that ended before they were killed, with how they ended.
    pub exits: Vec<String>,
}

impl Operator {
    pub fn new(ns: &str, issue_deadline: Duration, log: &Path) -> Self {
        let _ = std::fs::remove_file(log);
        Self {
            ns: ns.to_owned(),
            issue_deadline,
            log: log.to_owned(),
            child: None,
            metrics_port: 0,
            starts: 0,
            kills: 0,
            exits: Vec::new(),
        }
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Starts an incarnation unless one is running (noting how the previous one
    /// ended, if it exited by itself).
    pub fn ensure_running(&mut self) {
        self.reap();
        if self.child.is_some() {
            return;
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the keyward log");
        writeln!(log, "=== fault suite: keyward start #{} ===", self.starts).unwrap();
        self.metrics_port = keyward::control_plane::free_port();
        let deadline = format!("{}s", self.issue_deadline.as_secs());
        let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("run")
            .args(["--namespaces", &self.ns, "--operator-namespace", &self.ns])
            .args([
                "--metrics-bind-address",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(["--issue-deadline", &deadline])
            .env("KUBECONFIG", super::common::plane().kubeconfig())
            .env("POD_NAME", format!("keyward-{}", self.starts))
            .env("RUST_LOG", "info,keyward=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting keyward run");
        self.child = Some(child);
    }

    /// SIGKILL, and wait until the process is gone. False if none was running.
    pub fn sigkill(&mut self) -> bool {
        self.reap();
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = child.kill();
        let _ = child.wait();
        self.kills += 1;
        true
    }

    /// Notes an incarnation that exited by itself (and forgets it, so `start` works).
    fn reap(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exits.push(format!("start #{}: {status}", self.starts));
            self.child = None;
        }
    }

    /// The running incarnation's `/metrics`, if it answers.
    pub async fn metrics(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        reqwest::get(url).await.ok()?.text().await.ok()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
