//! The processes under test, and what `/proc` says about them.
//!
//! Each operator runs as a process of its own, so its CPU time and peak RSS are its
//! own. A watchdog shell holding a pipe from this process stops it if the benchmark
//! dies without cleaning up (the control plane does the same for its servers).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::Context as _;

/// A running process under test; dropping it kills it.
pub struct Process {
    pub name: String,
    child: Child,
    watchdog: Option<(Child, ChildStdin)>,
    /// Held open: a process that reads its standard input (the emulator) stops when
    /// this process is gone.
    _stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Process {
    /// Starts `command` with its output in `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdin = child.stdin.take();
        let pid = child.id();
        let mut watchdog = Command::new("sh")
            .args([
                "-c",
                &format!("read -r _; kill -TERM {pid}; sleep 5; kill -KILL {pid}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a watchdog shell")?;
        let pipe = watchdog.stdin.take().expect("piped stdin");
        Ok(Self {
            name: name.to_owned(),
            child,
            watchdog: Some((watchdog, pipe)),
            _stdin: stdin,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of its log if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Peak resident memory since the process started, in bytes (`VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:") * 1024
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the exit.
    pub async fn stop(mut self, grace: Duration) {
        self.disarm();
        signal(self.pid(), "TERM");
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL: a crash, as a node failure or an OOM kill would be.
    pub fn kill(mut self) {
        self.disarm();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn disarm(&mut self) {
        if let Some((mut watchdog, pipe)) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            drop(pipe);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.disarm();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status();
}

/// User + system CPU time of `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: fields are counted after its `)`.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let start = cpu_seconds(me);
        let spin = std::time::Instant::now();
        while cpu_seconds(me) <= start {
            assert!(
                spin.elapsed() < Duration::from_secs(10),
                "CPU time never rose"
            );
            std::hint::black_box(0);
        }
        assert!(status_kib(me, "VmHWM:") > 0);
    }
}
