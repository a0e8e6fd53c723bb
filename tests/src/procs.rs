//! Child processes that never outlive the test: each runs under a small Python guard that
//! makes itself the child subreaper of everything the command starts (so even processes
//! whose parent died, or that started sessions of their own, stay its descendants) and kills
//! that whole tree when the test process closes the guard's stdin — on drop, and also when
//! the test process dies without unwinding. Plus `/proc` look-ups to find and kill one
//! descendant by its executable (a function instance mid-task).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the command as a session leader; when stdin reaches end of file (the test process
/// closed it or died) or the command exits, kills every process left in the session.
const GUARD: &str = r#"
import ctypes, os, signal, subprocess, sys, threading, time

PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
me = os.getpid()
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)

def descendants():
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, frontier = [], [me]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                found.append(pid)
                frontier.append(pid)
    return found

def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

def kill_all():
    for _ in range(100):
        pids = descendants()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
        reap()

def watch_parent():
    sys.stdin.buffer.read()
    kill_all()
    os._exit(0)

threading.Thread(target=watch_parent, daemon=True).start()
code = child.wait()
kill_all()
sys.exit(code if code >= 0 else 128 - code)
"#;

/// AWS variables of the developer's shell that must not reach a test's processes (they would
/// point them at a real account or another endpoint).
pub const AMBIENT_AWS: &[&str] = &[
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
];

/// A process (and everything it starts) that is killed when this handle drops.
pub struct Guarded {
    child: Child,
    /// The file stdout goes to.
    pub stdout: PathBuf,
    /// The file stderr goes to.
    pub stderr: PathBuf,
    started: Instant,
}

impl Guarded {
    /// Starts `program args…` in `dir` with extra `env` (and without the inherited variables
    /// named in [`AMBIENT_AWS`]), its output captured to files under `log_dir` named after
    /// `label`.
    pub fn spawn(
        label: &str,
        program: &str,
        args: &[String],
        dir: &Path,
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Result<Self, String> {
        let stdout = log_dir.join(format!("{label}.stdout.log"));
        let stderr = log_dir.join(format!("{label}.stderr.log"));
        let out = File::create(&stdout).map_err(|e| format!("{}: {e}", stdout.display()))?;
        let err = File::create(&stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        let mut command = Command::new("python3");
        command
            .arg("-c")
            .arg(GUARD)
            .arg(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err);
        for name in AMBIENT_AWS {
            command.env_remove(name);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot run python3 to guard {program}: {e}"))?;
        Ok(Self {
            child,
            stdout,
            stderr,
            started: Instant::now(),
        })
    }

    /// Whether the guard (and so the command) is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the command printed so far, stderr then stdout.
    pub fn output(&self) -> String {
        let mut text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(&self.stdout).unwrap_or_default());
        text
    }

    /// How long ago it started.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Kills every descendant whose executable's file name is `exe`; returns their pids.
    pub fn kill_by_exe(&self, exe: &str) -> Vec<u32> {
        let victims = self.pids_of(exe);
        for pid in &victims {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        victims
    }

    /// The descendant that owns the client end of the TCP connection from local port `port`
    /// to a server listening on `peer_port` — e.g. the call a fake server is holding. Both
    /// ports, because Linux gives one local port to several connections to different peers.
    pub fn pid_with_connection(&self, port: u16, peer_port: u16) -> Option<u32> {
        let inodes = socket_inodes_of_connection(port, peer_port);
        if inodes.is_empty() {
            return None;
        }
        descendants(self.child.id()).into_iter().find(|pid| {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                return false;
            };
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|target| {
                    let target = target.to_str()?.to_owned();
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .any(|inode| inodes.contains(&inode))
        })
    }

    /// Kills one descendant (SIGKILL); whether it was one.
    pub fn kill_descendant(&self, pid: u32) -> bool {
        if !descendants(self.child.id()).contains(&pid) {
            return false;
        }
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The pids of the descendants running `exe`.
    pub fn pids_of(&self, exe: &str) -> Vec<u32> {
        descendants(self.child.id())
            .into_iter()
            .filter(|pid| exe_name(*pid).as_deref() == Some(exe))
            .collect()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // Closing stdin tells the guard to kill the session and exit.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(pid, ppid)` of every process, read from `/proc`.
fn processes() -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: fields start after the last `)`.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// The inodes of TCP sockets (IPv4 and IPv6) from local port `port` to remote port
/// `peer_port`.
fn socket_inodes_of_connection(port: u16, peer_port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port_of = |field: usize| {
                fields
                    .get(field)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if port_of(1) == Some(port)
                && port_of(2) == Some(peer_port)
                && let Some(inode) = fields.get(9).and_then(|i| i.parse::<u64>().ok())
                && inode != 0
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}

/// Every descendant of `root`.
fn descendants(root: u32) -> Vec<u32> {
    let all = processes();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, ppid) in &all {
            if *ppid == parent {
                found.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    found
}

/// The executable's file name, without the ` (deleted)` of a binary rebuilt while it runs.
fn exe_name(pid: u32) -> Option<String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = exe.file_name()?.to_str()?;
    Some(name.trim_end_matches(" (deleted)").to_owned())
}
