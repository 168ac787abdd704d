//! The `gateway` binary as a child process on free ports, for tests that need a real
//! process: SIGKILL, SIGTERM, or its log output. Killed on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::redis_server::free_port;
use super::{http, T};

pub struct GatewayProcess {
    child: Child,
    pub port: u16,
    pub admin: SocketAddr,
}

impl GatewayProcess {
    /// Starts `gateway <args>` on free ports, stderr (its logs) to `stderr`, and waits until
    /// `/readyz` answers 200.
    pub async fn start(args: &[&str], stderr: Stdio) -> GatewayProcess {
        let (port, admin_port) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("gateway binary");
        let g = GatewayProcess {
            child,
            port,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        };
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let up = tokio::net::TcpStream::connect(g.admin).await.is_ok()
                && http(g.admin, "GET", "/readyz", "", "").await.0 == 200;
            if up {
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
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
