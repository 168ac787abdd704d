//! The `gateway` binary as a child process, for tests that need a real process: SIGKILL,
//! SIGTERM, or its log output. It binds ports of its own choosing, which the test learns from
//! its `gateway serving` log line. Killed on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{http, T};

pub struct GatewayProcess {
    child: Child,
    /// `cat`, carrying the node's log lines on to where the test wants them.
    logs: Child,
    pub port: u16,
    pub admin: SocketAddr,
}

/// The bound addresses (public, admin), or, if the node exited first, what it logged.
type Bound = Result<(SocketAddr, SocketAddr), String>;

impl GatewayProcess {
    /// Starts `gateway <args>` on `127.0.0.1:0` for both listeners, logging JSON to `stderr`,
    /// and waits until `/readyz` answers 200. The log lines pass through this helper on their
    /// way, which reads the bound ports from them.
    pub async fn start(args: &[&str], stderr: Stdio) -> GatewayProcess {
        // a `Stdio` cannot be written to from here, but it can be a child's stdout
        let mut logs = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(stderr)
            .spawn()
            .expect("cat");
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway binary");
        let bound = copy_logs(
            child.stderr.take().expect("piped stderr"),
            logs.stdin.take().expect("piped stdin"),
        );
        let bound = tokio::time::timeout(T, bound).await;
        let (listen, admin) = match bound {
            Ok(Ok(Ok(addrs))) => addrs,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = logs.wait();
                panic!("{args:?}: no `gateway serving` line: {other:?}");
            }
        };
        let g = GatewayProcess {
            child,
            logs,
            port: listen.port(),
            admin,
        };
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if http(g.admin, "GET", "/readyz", "", "").await.0 == 200 {
                return g;
            }
            assert!(tokio::time::Instant::now() < deadline, "{args:?} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as an orchestrator stopping the node would.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits up to `within` for the process to exit.
    pub async fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
        // its stderr is closed now, so `cat` gets the end of its input and exits
        let _ = self.logs.wait();
    }
}

/// Copies the node's log lines from `from` to `to` until it exits, on a thread of its own (the
/// node must never block on a full pipe), and answers with the addresses its `gateway
/// serving` line names.
fn copy_logs(from: ChildStderr, mut to: ChildStdin) -> oneshot::Receiver<Bound> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut before = String::new();
        let mut from = BufReader::new(from);
        let mut line = Vec::new();
        while from.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = to.write_all(&line);
            if tx.is_some() {
                let text = String::from_utf8_lossy(&line);
                match serving(&text) {
                    Some(addrs) => {
                        let _ = tx.take().map(|tx| tx.send(Ok(addrs)));
                    }
                    None => before.push_str(&text),
                }
            }
            line.clear();
        }
        let _ = tx.map(|tx| tx.send(Err(before)));
    });
    rx
}

/// The public and admin addresses in a `gateway serving` JSON log line.
fn serving(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = &v["fields"];
    if fields["message"] != "gateway serving" {
        return None;
    }
    // logged with `?`, as `Some(127.0.0.1:40123)`
    let addr = |name: &str| -> Option<SocketAddr> {
        fields[name]
            .as_str()?
            .strip_prefix("Some(")?
            .strip_suffix(')')?
            .parse()
            .ok()
    };
    Some((addr("listen")?, addr("admin")?))
}
