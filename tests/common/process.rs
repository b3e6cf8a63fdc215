//! Real `branchd` processes for tests: started from a directory with a
//! clean environment, read for their printed address, stopped with
//! SIGTERM or killed with SIGKILL.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_branchd");

/// `branchd` with no `BRANCHD_*` or `DATABASE_URL` from the test's
/// environment, run in `dir`: what a fresh user gets.
pub fn branchd(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("BRANCHD_") || name == "DATABASE_URL" {
            command.env_remove(name);
        }
    }
    command.current_dir(dir).env("BRANCHD_LOG", "warn");
    command
}

/// A `branchd serve` process and the lines it printed on stdout.
pub struct Served {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub printed: Vec<String>,
    pub base: String,
}

impl Served {
    pub fn start(dir: &Path) -> Served {
        Self::start_with(dir, &[])
    }

    /// Starts with extra environment variables.
    pub fn start_with(dir: &Path, envs: &[(&str, &str)]) -> Served {
        Self::spawn(branchd(dir).envs(envs.iter().copied()))
    }

    /// Starts with extra environment variables and at most `nofile` open
    /// files (soft and hard `RLIMIT_NOFILE`, so the server cannot raise it).
    pub fn start_with_open_file_limit(dir: &Path, envs: &[(&str, &str)], nofile: u64) -> Served {
        use std::os::unix::process::CommandExt;
        let mut command = branchd(dir);
        command.envs(envs.iter().copied());
        let limit = libc::rlimit {
            rlim_cur: nofile,
            rlim_max: nofile,
        };
        // SAFETY: between fork and exec the closure only calls setrlimit,
        // which is async-signal-safe, on a value it owns.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Self::spawn(&mut command)
    }

    fn spawn(command: &mut Command) -> Served {
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn branchd serve");
        let stdout = child.stdout.take().expect("stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut printed = Vec::new();
        let base = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("branchd printed its address within 60 s");
            if let Some(addr) = line.strip_prefix("branchd: listening on ") {
                break addr.to_string();
            }
            printed.push(line);
        };
        Served {
            child,
            lines,
            printed,
            base,
        }
    }

    pub fn admin_password(&self) -> Option<String> {
        self.printed.iter().find_map(|line| {
            line.split_once("with password: ")
                .map(|(_, password)| password.to_string())
        })
    }

    /// A memory figure of the process from /proc (`VmRSS`, `VmHWM`: the
    /// most it has had resident so far), in KiB.
    pub fn memory_kib(&self, field: &str) -> u64 {
        let pid = self.child.id();
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// The most memory the process has had resident so far, in bytes.
    pub fn peak_memory(&self) -> u64 {
        self.memory_kib("VmHWM") * 1024
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (SIGSTOP, SIGCONT, ...) without waiting.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Freezes the process (SIGSTOP) and returns once every one of its
    /// threads is stopped: a signal is delivered asynchronously, and a
    /// thread still running could answer a request sent right after.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.child.id());
        let stopped = || {
            std::fs::read_dir(&tasks).is_ok_and(|threads| {
                threads.flatten().all(|thread| {
                    std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
                        // The state follows the parenthesised command name.
                        stat.rsplit_once(')')
                            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                    })
                })
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !stopped() {
            assert!(
                std::time::Instant::now() < deadline,
                "the process did not stop within 10 s of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it.
    pub fn kill(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "branchd exited with {status}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Anything printed after start-up is over; drain it.
        while self.lines.try_recv().is_ok() {}
    }
}

/// A process a test did not stop (it failed first) is killed, so that no
/// orphan outlives its test and its data dir.
impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn login(http: &reqwest::Client, base: &str, username: &str, password: &str) -> String {
    let response = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .expect("login request");
    assert_eq!(response.status(), 200, "login as {username}");
    let body: Value = response.json().await.expect("json");
    body["token"].as_str().expect("token").to_string()
}

/// Creates a project over HTTP and returns its id.
pub async fn create_project(http: &reqwest::Client, base: &str, token: &str, name: &str) -> i64 {
    let project: Value = http
        .post(format!("{base}/api/projects"))
        .bearer_auth(token)
        .json(&json!({"name": name}))
        .send()
        .await
        .expect("create a project")
        .json()
        .await
        .expect("json");
    project["id"].as_i64().expect("a project id")
}

/// The server tags a node has a ready session with, from its
/// `GET /ops/api/cluster` view.
pub fn ready_peers(view: &Value) -> std::collections::HashSet<String> {
    view["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["ready"] == true)
        .filter_map(|p| p["server_tag"].as_str().map(str::to_string))
        .collect()
}
